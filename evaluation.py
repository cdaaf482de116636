"""The evaluation target: retrieval (dense vs BM25) and generation (retrieved / oracle / random chunks) on a split.

    python main.py --target eval [--split test] [--retriever dense|bm25] [--top_k 5]

Uses the existing checkpoints (nothing is trained) and writes `<save_dir>/eval/<run-id>/`:
    report.json        every number, plus the configuration it was measured under
    report.md          the same as Markdown tables, ready for the README
    predictions.jsonl  one line per question: rankings, the chunks fed to the generator, answers and scores

A retrieved chunk is a hit when its normalised text contains a normalised gold answer as whole words
(`metrics.contains_answer`), so dense and BM25 are judged the same way whatever the dataset's labels say; the
dataset's labelled chunks give a second Recall@K line.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import checkpoint as ckpt
from datasets import whole_word_texts
from training import UsageError
from metrics import (
    aggregate_qa,
    count_no_relevant,
    exact_match,
    latency_percentiles,
    mean_reciprocal_rank,
    normalize_answer,
    recall_at_k,
    token_f1,
)

KS = (1, 5, 20, 100)
RETRIEVERS = ("dense", "bm25")
SPLITS = ("valid", "test")
BM25_SOURCE = "ragmlx_eval_source.json"  # sidecar naming the dataset a cached BM25 index was built from


# ---------------------------------------------------------------- retrieval


def normalised_chunk_texts(texts: Sequence[str]) -> list[str]:
    """Each chunk text normalised like the answers and space-padded, so a whole-word test is one `in`."""
    return [f" {normalize_answer(t)} " for t in texts]


def answer_texts(data) -> list[str]:
    """Each chunk's text as answers are matched against it, the dataset's labels' way: normalised, without a word
    that a chunk boundary cuts (the "123" of a year split "123|1" is not the answer "123")."""
    return normalised_chunk_texts(whole_word_texts(data.tokenizer, np.asarray(data.chunks), np.asarray(data.chunk_doc)))


def answer_hits(
    ranked_ids: np.ndarray, chunk_texts_normalised: Sequence[str], answers: Sequence[Sequence[str]]
) -> list[list[int]]:
    """Per question, the retrieved chunk ids whose text contains a normalised gold answer (as
    `metrics.contains_answer` decides: whole tokens; aliases that normalise to nothing never match); an id of -1
    marks a slot that retrieved nothing."""
    ranked = np.asarray(ranked_ids)
    if ranked.ndim != 2 or len(ranked) != len(answers):
        raise ValueError(
            f"ranked_ids must be [questions, K] with one row per answer list, got {ranked.shape} "
            f"for {len(answers)} questions"
        )
    out = []
    for row, aliases in zip(ranked, answers):
        norm = [f" {a} " for a in (normalize_answer(x) for x in aliases) if a]
        out.append([int(c) for c in row if c >= 0 and any(a in chunk_texts_normalised[int(c)] for a in norm)])
    return out


def ranking_metrics(ranked_ids: np.ndarray, relevant: Sequence[Sequence[int]], ks: Sequence[int] = KS) -> dict:
    """Recall@k for each k, MRR over the whole ranked list, and how many questions have no relevant id in it."""
    recall = recall_at_k(ranked_ids, relevant, ks)
    out = {f"recall@{k}": v for k, v in recall.items()}
    out["mrr"] = mean_reciprocal_rank(ranked_ids, relevant)
    out["n"] = int(len(relevant))
    out["questions_without_hit"] = count_no_relevant(relevant)
    return out


def retrieval_metrics(
    ranked_ids: np.ndarray,
    chunk_texts_normalised: Sequence[str],
    answers: Sequence[Sequence[str]],
    ks: Sequence[int] = KS,
) -> dict:
    """Recall@k / MRR where a hit is a retrieved chunk that contains a gold answer (see `answer_hits`)."""
    return ranking_metrics(ranked_ids, answer_hits(ranked_ids, chunk_texts_normalised, answers), ks)


def first_hit_rank(ranked: Sequence[int], relevant: Sequence[int]) -> int | None:
    """1-based rank of the first relevant id in `ranked`, None when there is none."""
    rel = set(int(r) for r in relevant)
    return next((i + 1 for i, c in enumerate(ranked) if int(c) in rel), None)


def timed_search(
    search_one: Callable[[int], tuple[np.ndarray, np.ndarray]], n: int, depth: int
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Run `search_one(i)` -> (scores [d], ids [d]) for questions 0..n-1 one at a time, timing each call.

    One untimed call first, so one-off start-up costs (kernel compilation, caches) are not billed to question 0.
    Returns (scores [n, depth], ids [n, depth], seconds per question)."""
    scores = np.zeros((n, depth), np.float32)
    ids = np.zeros((n, depth), np.int64)
    seconds = []
    if n:
        search_one(0)
    for i in range(n):
        tic = time.perf_counter()
        s, c = search_one(i)
        seconds.append(time.perf_counter() - tic)
        if len(c) != depth:
            raise ValueError(f"search returned {len(c)} ids for question {i}, expected {depth}")
        scores[i], ids[i] = s, c
    return scores, ids, seconds


def dense_searcher(model, questions: np.ndarray, index, depth: int) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    """Search one stored question (token row) against the whole dense index: embed it, then exact top-k."""
    import mlx.core as mx

    import index as chunk_index

    def search_one(i: int):
        s, c = chunk_index.search(model(mx.array(np.asarray(questions[i : i + 1]))), index, depth)
        return s[0], c[0]

    return search_one


def bm25_searcher(bm25, questions: Sequence[str], depth: int) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
    """Search one question text against the whole BM25 index."""

    def search_one(i: int):
        s, c = bm25.search([questions[i]], depth)
        return s[0], c[0]

    return search_one


def load_or_build_bm25(directory: str | Path, chunk_texts: Sequence[str], source: dict, log=print):
    """The BM25 index over `chunk_texts`, cached in `directory`; rebuilt when the cache was made from other
    chunks (its sidecar `source` differs, e.g. another --context_size with the same tokenizer) or is unreadable."""
    from bm25 import BM25Retriever

    directory = Path(directory)
    sidecar = directory / BM25_SOURCE
    if sidecar.is_file():
        try:
            if json.loads(sidecar.read_text()) == source:
                bm25 = BM25Retriever.load(directory)
                if bm25.num_chunks == len(chunk_texts):
                    return bm25
            log(f"warning: {directory} holds a BM25 index of other chunks; rebuilding")
        except (OSError, ValueError, KeyError, TypeError) as e:  # a config missing a key: KeyError
            log(f"warning: {directory}: unreadable BM25 index ({e!r}); rebuilding")
    tic = time.perf_counter()
    bm25 = BM25Retriever.build(chunk_texts)
    # The sidecar goes in the same swap as the index (two evaluations building at once each swap in a whole folder).
    bm25.save(directory, extra={BM25_SOURCE: source})
    log(f"bm25: indexed {len(chunk_texts):,} chunks in {time.perf_counter() - tic:.1f}s, cached in {directory}")
    return bm25


# ---------------------------------------------------------------- generation


def oracle_chunk_ids(positives: Sequence[Sequence[int]], retrieved: np.ndarray) -> tuple[np.ndarray, int]:
    """[N, K] generator input with each question's labelled chunks first (at most K), the remaining slots
    filled by its retrieved chunks (the generator always reads K passages). A question without labelled chunks
    gets its retrieved chunks unchanged. Returns (ids, number of such questions)."""
    retrieved = np.asarray(retrieved)
    n, k = retrieved.shape
    if len(positives) != n:
        raise ValueError(f"{len(positives)} positive lists for {n} retrieved rows")
    out = np.empty_like(retrieved)
    fallback = 0
    for i, pos in enumerate(positives):
        gold = list(dict.fromkeys(int(c) for c in pos))[:k]
        if not gold:
            fallback += 1
        fill = [int(c) for c in retrieved[i] if int(c) not in gold][: k - len(gold)]
        out[i] = gold + fill
    return out, fallback


def generate_answers(
    model, data, question_ids: np.ndarray, chunk_ids: np.ndarray, batch_size: int = 64, max_tokens: int | None = None
) -> list[str]:
    """Greedy answers (decoded text), batched, for questions `question_ids` reading chunks `chunk_ids` [N, K]."""
    import generator

    passages = generator.build_passages(data, data.questions[question_ids], np.asarray(chunk_ids))
    return [data.decode(t) for t in generator.greedy_answers(model, passages, batch_size, max_tokens)]


def score_predictions(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> list[dict]:
    """Per question {"em", "f1"}: official normalisation, max over aliases."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    return [{"em": exact_match(p, a), "f1": token_f1(p, a)} for p, a in zip(predictions, answers)]


def generation_metrics(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict:
    """Mean EM and F1 over the questions: {"em", "f1", "n"}."""
    return aggregate_qa(predictions, answers)


# ---------------------------------------------------------------- report


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def dense_index_phrase(cfg: dict) -> str:
    """How the dense retriever searched, for report.md: exact, or an approximate (faiss / usearch) index, whose
    recall and latency then differ from exact search's."""
    kind = cfg.get("dense_index", "exact")
    return "n exact" if kind == "exact" else f"n approximate ({kind})"


def render_markdown(report: dict) -> str:
    """report.json as Markdown: one retrieval table (dense vs BM25) and one generation table."""
    cfg = report["config"]
    ks = cfg["ks"]
    lines = [
        f"### Evaluation on the {cfg['split']} split ({cfg['num_questions']} questions)",
        "",
        f"Generator `{cfg['generator_id'][:8]}` reads the top {cfg['top_k']} chunks of the **{cfg['retriever']}** "
        f"retriever; dense retriever `{cfg['retriever_id'][:8]}` searching a{dense_index_phrase(cfg)} index; "
        f"{cfg['dataset']['num_chunks']:,} chunks of "
        f"{cfg['dataset']['context_size']} tokens ({cfg['dataset']['source'].get('data')} data).",
        "",
        "Retrieval (%). Relevance: *answer in chunk* = the chunk's text contains a normalised gold answer; "
        f"*dataset labels* = the dataset's labelled answer chunks. MRR over the top {max(ks)}; latency is per "
        "question, one at a time, over the whole index:",
        "",
        "| Retriever | Relevance | " + " | ".join(f"R@{k}" for k in ks) + " | MRR | p50 ms | p95 ms |",
        "|---|---|" + "---:|" * (len(ks) + 3),
    ]
    for kind, name in (("dense", "dense"), ("bm25", "BM25")):
        r = report["retrieval"][kind]
        for rel, label in (("answer", "answer in chunk"), ("labels", "dataset labels")):
            m = r[rel]
            lat = r["latency"] if rel == "answer" else {}
            lines.append(
                f"| {name} | {label} | "
                + " | ".join(_pct(m[f"recall@{k}"]) for k in ks)
                + f" | {_pct(m['mrr'])} | {_ms(lat.get('p50_ms'))} | {_ms(lat.get('p95_ms'))} |"
            )
    g = report["generation"]
    lines += [
        "",
        "Generation (%; greedy decoding):",
        "",
        "| Generator input | EM | F1 |",
        "|---|---:|---:|",
        f"| top-{cfg['top_k']} {cfg['retriever']} | {_pct(g['retrieved']['em'])} | {_pct(g['retrieved']['f1'])} |",
        f"| oracle (labelled chunks) | {_pct(g['oracle']['em'])} | {_pct(g['oracle']['f1'])} |",
        f"| random chunks (seed {cfg['seed']}) | {_pct(g['random']['em'])} | {_pct(g['random']['f1'])} |",
    ]
    fallback = g["oracle"].get("questions_without_labels", 0)
    if fallback:
        lines += [
            "",
            f"Oracle: {fallback} of {cfg['num_questions']} questions have no labelled chunk and read "
            f"their retrieved chunks instead.",
        ]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, report: dict, rows: Sequence[dict]) -> dict[str, Path]:
    """Write report.json, report.md and predictions.jsonl into `out_dir`, each atomically."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "predictions": out_dir / "predictions.jsonl"}
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    ckpt.atomic_write_bytes(paths["predictions"], body.encode("utf-8"))
    ckpt.atomic_write_bytes(paths["md"], render_markdown(report).encode("utf-8"))
    ckpt.atomic_write_json(paths["json"], report)  # last: a run folder with report.json is complete
    return paths


def new_run_dir(eval_dir: str | Path, split: str, generator_id: str, kind: str) -> Path:
    """A fresh `<eval_dir>/<split>-<generator id[:8]>-<retriever>-<UTC time>` folder (suffixed if taken)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = f"{split}-{generator_id[:8]}-{kind}-{stamp}"
    Path(eval_dir).mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = Path(eval_dir) / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UsageError(f"{eval_dir}: cannot create a new run folder for {base}")


def dataset_summary(meta: dict) -> dict:
    keys = (
        "source",
        "fingerprint",
        "tokenizer_sha1",
        "vocab_size",
        "context_size",
        "num_documents",
        "num_chunks",
        "num_qa",
        "splits",
        "questions_without_answer_chunk",
    )
    return {k: meta.get(k) for k in keys}


def _checkpoint_meta(directory: Path, ckpt_type: str, ckpt_id: str | None) -> dict:
    if ckpt_id is None or not directory.is_dir():
        return {}
    return next((m for m in ckpt.list_checkpoints(directory, ckpt_type) if m.get("id") == ckpt_id), {})


# ---------------------------------------------------------------- the target


def run_eval(
    args, data, retr, index, gen, retriever_id: str = "unknown", generator_id: str = "unknown", log=print
) -> tuple[dict, dict[str, Path]]:
    """Evaluate on `args.split` and write the report; returns (report, paths of the written files).

    Reads args.split, args.retriever, args.top_k, args.seed, args.save_dir and args.max_answer_tokens."""
    import index as chunk_index
    import pipeline

    split, kind, top_k = getattr(args, "split", "test"), getattr(args, "retriever", "dense"), int(args.top_k)
    if split not in SPLITS:
        raise UsageError(f"--split must be one of {SPLITS}, got {split!r}")
    if kind not in RETRIEVERS:
        raise UsageError(f"--retriever must be one of {RETRIEVERS}, got {kind!r}")
    if top_k <= 0:
        raise UsageError(f"--top_k must be positive, got {top_k}")
    ids = data.split_indices(split)
    if len(ids) == 0:
        raise UsageError(f"--split {split}: the dataset in {data.path} has no {split} questions")
    n_chunks = len(data.chunks)
    depth = min(max(max(KS), top_k), n_chunks)
    k_fed = min(top_k, n_chunks)
    qa = [data.qa[int(i)] for i in ids]
    answers = [q["answers"] for q in qa]
    labels = [data.positives(int(i)).tolist() for i in ids]

    log(f"eval: {len(ids):,} {split} questions, {n_chunks:,} chunks; decoding chunk texts")
    texts = [data.chunk_text(c) for c in range(n_chunks)]
    norm = answer_texts(data)
    bm25_dir = Path(args.save_dir) / "bm25" / data.tokenizer_sha1[:12]
    source = {"chunks_sha1": chunk_index.chunks_fingerprint(data.chunks), "num_chunks": n_chunks}
    bm25 = load_or_build_bm25(bm25_dir, texts, source, log)

    rankings, hits, retrieval = {}, {}, {}
    searchers = {
        "dense": dense_searcher(retr, data.questions[ids], index, depth),
        "bm25": bm25_searcher(bm25, [q["question"] for q in qa], depth),
    }
    for name, search_one in searchers.items():
        scores, ranked, seconds = timed_search(search_one, len(ids), depth)
        rankings[name] = (scores, ranked)
        # BM25 scores 0 a chunk that holds no term of the question: filler in its top list, never a hit (a question
        # of stopwords or unknown words would otherwise "retrieve" chunks 0, 1, 2...).
        counted = np.where(scores > 0, ranked, -1) if name == "bm25" else ranked
        hits[name] = answer_hits(counted, norm, answers)
        retrieval[name] = {
            "answer": ranking_metrics(counted, hits[name]),
            "labels": ranking_metrics(counted, labels),
            "latency": latency_percentiles(seconds),
        }
        if name == "bm25":
            retrieval[name]["questions_matching_no_chunk"] = int((scores[:, 0] <= 0).sum())
        log(
            f"eval: {name} recall@5 {retrieval[name]['answer']['recall@5']:.3f}, "
            f"p50 {retrieval[name]['latency']['p50_ms']:.2f} ms"
        )

    fed_scores, fed = rankings[kind][0][:, :k_fed], rankings[kind][1][:, :k_fed]
    oracle, fallback = oracle_chunk_ids(labels, fed)
    inputs = {"retrieved": fed, "oracle": oracle, "random": pipeline.random_chunks(data, len(ids), k_fed, args.seed)}
    predictions, per_question, generation = {}, {}, {}
    for setting, chunk_ids in inputs.items():
        tic = time.perf_counter()
        predictions[setting] = generate_answers(gen, data, ids, chunk_ids, max_tokens=args.max_answer_tokens)
        per_question[setting] = score_predictions(predictions[setting], answers)
        generation[setting] = generation_metrics(predictions[setting], answers)
        log(
            f"eval: {setting:<9} EM {generation[setting]['em']:.3f} F1 {generation[setting]['f1']:.3f} "
            f"({time.perf_counter() - tic:.1f}s)"
        )
    generation["oracle"]["questions_without_labels"] = fallback

    gen_meta = _checkpoint_meta(pipeline.checkpoint_dir(args), "generator", generator_id)
    pipeline.warn_if_trained_on_another_retriever(gen_meta, retriever_id, log)
    report = {
        "config": {
            "split": split,
            "num_questions": int(len(ids)),
            "top_k": k_fed,
            "retriever": kind,
            "dense_index": getattr(args, "index", "exact"),
            "ks": list(KS),
            "depth": depth,
            "seed": args.seed,
            "retriever_id": retriever_id,
            "generator_id": generator_id,
            "generator_step": gen_meta.get("step"),
            "generator_trained_with_retriever": gen_meta.get("retriever"),
            "bm25": {"k1": bm25.k1, "b": bm25.b, "method": bm25.method, "stem": bm25.stem, "cache": str(bm25_dir)},
            "dataset": dataset_summary(data.meta),
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        "retrieval": retrieval,
        "generation": generation,
    }
    rows = []
    for j, q in enumerate(qa):
        row = {
            "id": q["id"],
            "question": q["question"],
            "answers": q["answers"],
            "retriever": kind,
            "retrieved": [
                {"chunk": int(c), "score": round(float(s), 6), "title": data.chunk_title(int(c))}
                for c, s in zip(fed[j], fed_scores[j])
            ],
            "prediction": predictions["retrieved"][j],
            **per_question["retrieved"][j],
            "oracle": {
                "chunks": oracle[j].tolist(),
                "prediction": predictions["oracle"][j],
                **per_question["oracle"][j],
            },
            "random": {
                "chunks": inputs["random"][j].tolist(),
                "prediction": predictions["random"][j],
                **per_question["random"][j],
            },
            "labelled_chunks": labels[j],
        }
        for name, (_, ranked) in rankings.items():
            row[f"{name}_ranked"] = ranked[j].tolist()
            row[f"{name}_first_hit"] = first_hit_rank(ranked[j], hits[name][j])
        rows.append(row)
    out_dir = new_run_dir(Path(args.save_dir) / "eval", split, generator_id, kind)
    paths = write_report(out_dir, report, rows)
    log("\n" + render_markdown(report))
    log(f"eval: wrote {paths['json']}, {paths['md'].name} and {paths['predictions'].name}")
    return report, paths


def require_checkpoints(directory: Path) -> None:
    """A UsageError unless `directory` holds a retriever and a generator checkpoint (main.py checks this before
    building a dataset that nothing could then evaluate)."""
    for ckpt_type, target in (("retriever", "retriever"), ("generator", "all")):
        if not (directory.is_dir() and ckpt.list_checkpoints(directory, ckpt_type)):
            raise UsageError(
                f"--target eval: no {ckpt_type} checkpoint in {directory}; train one with --target {target}"
            )


def eval_target(args, data) -> int:
    """`--target eval`: load the newest (or --identifier / --retriever_identifier) checkpoints and evaluate."""
    import pipeline

    require_checkpoints(pipeline.checkpoint_dir(args))
    retr, rid, index = pipeline.get_retriever(args, data, train=False)
    gen, gid = pipeline.get_generator(args, data, None, rid, train=False)
    run_eval(args, data, retr, index, gen, retriever_id=rid, generator_id=gid)
    return 0
