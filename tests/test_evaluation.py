"""The evaluation target: retrieval metrics on planted chunks, the BM25 cache, the oracle input, and a small
end-to-end run whose report must agree with its own predictions.jsonl."""

from __future__ import annotations

import json

import numpy as np
import pytest

import evaluation as ev
from metrics import contains_answer, exact_match, normalize_answer, recall_at_k, token_f1

# Planted chunks: 3 holds "Parisian" (not the word "Paris"), 5 holds "U.S.A." (normalises to "usa").
TEXTS = [
    "The capital of France is Paris.",
    "Berlin is the capital of Germany.",
    "Mount Everest is 8,849 metres tall.",
    "The Parisian cafe serves coffee.",
    "Rome, the Eternal City, has seven hills.",
    "The U.S.A. declared independence in 1776.",
]
ANSWERS = [["Paris"], ["8849 metres"], ["USA", "The"], ["London"]]
RANKED = np.array(
    [
        [3, 0, 1, 2, 4, 5],  # first hit at rank 2 (chunk 3 is "parisian", not a whole-word match)
        [2, 0, 1, 3, 4, 5],  # rank 1
        [0, 1, 2, 3, 4, 5],  # rank 6 ("The" normalises to nothing and must not match every chunk)
        [5, 4, 3, 2, 1, 0],  # never
    ]
)


def test_answer_hits_are_whole_word_matches_like_contains_answer():
    norm = ev.normalised_chunk_texts(TEXTS)
    hits = ev.answer_hits(RANKED, norm, ANSWERS)
    assert hits == [[0], [2], [5], []]
    expected = [[int(c) for c in row if contains_answer(TEXTS[c], a)] for row, a in zip(RANKED, ANSWERS)]
    assert hits == expected
    # -1 marks a slot that retrieved nothing (BM25 scoring 0): never a hit, and never read as the last chunk
    unmatched = np.where(np.arange(6) < 5, RANKED[2], -1)[None]
    assert ev.answer_hits(unmatched, norm, [["USA"]]) == [[]]
    assert ev.ranking_metrics(unmatched, [[5]])["recall@5"] == 0.0


def test_a_word_cut_by_a_chunk_boundary_is_no_answer_hit(tmp_path):
    """Eval matches answers against chunk texts as the dataset labels them: the piece of a word that a boundary
    cuts off (a "123" of "1231") is not the answer "123" (it was counted, inflating answer-in-chunk recall)."""
    from helpers import build_builtin

    data = build_builtin(tmp_path / "ds", corpus_size=40, context_size=16)
    raw = [data.chunk_text(c) for c in range(len(data.chunks))]
    matched, whole = ev.answer_texts(data), ev.normalised_chunk_texts(raw)
    last = [normalize_answer(t.split()[-1]) if t.split() else "" for t in raw]  # each chunk's last word
    cut = [c for c, w in enumerate(last) if w and f" {w} " in whole[c] and f" {w} " not in matched[c]]
    assert cut, "no chunk of the corpus ends inside a word"
    for c in cut[:10]:
        assert ev.answer_hits(np.array([[c]]), whole, [[last[c]]]) == [[c]]  # in the raw text
        assert ev.answer_hits(np.array([[c]]), matched, [[last[c]]]) == [[]]


def test_retrieval_metrics_on_planted_index():
    m = ev.retrieval_metrics(RANKED, ev.normalised_chunk_texts(TEXTS), ANSWERS)
    assert m["recall@1"] == pytest.approx(1 / 4)
    assert m["recall@5"] == pytest.approx(2 / 4)
    assert m["recall@20"] == pytest.approx(3 / 4)  # k above the list length counts the whole list
    assert m["recall@100"] == pytest.approx(3 / 4)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 6 + 0) / 4)
    assert m["n"] == 4 and m["questions_without_hit"] == 1
    assert [ev.first_hit_rank(r, h) for r, h in zip(RANKED, [[0], [2], [5], []])] == [2, 1, 6, None]


def test_label_metrics_use_the_given_labels_not_the_text():
    m = ev.ranking_metrics(RANKED, [[3], [1], [], [0]], ks=(1, 5))
    assert m["recall@1"] == pytest.approx(1 / 4)  # question 0: labelled chunk 3 is ranked first
    assert m["recall@5"] == pytest.approx(2 / 4)  # question 1: chunk 1 at rank 3; question 3: chunk 0 at rank 6
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 0 + 1 / 6) / 4)
    assert m["questions_without_hit"] == 1


def test_bm25_returns_the_planted_chunk_first_and_is_cached(tmp_path):
    logs = []
    source = {"dataset_fingerprint": "abc", "num_chunks": len(TEXTS)}
    bm25 = ev.load_or_build_bm25(tmp_path / "bm25", TEXTS, source, logs.append)
    questions = ["Which city is the capital of France?", "How tall is Mount Everest?", "What does the cafe serve?"]
    scores, ids, seconds = ev.timed_search(ev.bm25_searcher(bm25, questions, 4), len(questions), 4)
    assert ids[:, 0].tolist() == [0, 2, 3]
    assert np.all(np.diff(scores, axis=1) <= 0) and len(seconds) == 3 and min(seconds) >= 0
    assert sum("indexed" in line for line in logs) == 1

    ev.load_or_build_bm25(tmp_path / "bm25", TEXTS, source, logs.append)  # reused, not rebuilt
    assert sum("indexed" in line for line in logs) == 1
    other = TEXTS[:4]  # same folder, other chunks (e.g. another --context_size): must be rebuilt
    rebuilt = ev.load_or_build_bm25(
        tmp_path / "bm25", other, {"dataset_fingerprint": "def", "num_chunks": 4}, logs.append
    )
    assert rebuilt.num_chunks == 4 and sum("indexed" in line for line in logs) == 2
    # the sidecar is swapped in with the index (never written into a folder another build may replace)
    assert (tmp_path / "bm25" / ev.BM25_SOURCE).is_file() and not list(tmp_path.glob(".bm25*"))


def test_an_empty_bm25_array_file_is_rebuilt_not_a_traceback(tmp_path):
    source = {"chunks_sha1": "abc", "num_chunks": len(TEXTS)}
    ev.load_or_build_bm25(tmp_path / "bm25", TEXTS, source, lambda _m: None)
    (victim,) = [p for p in sorted((tmp_path / "bm25").glob("*.npy"))][:1]
    victim.write_bytes(b"")  # np.load raises EOFError on it
    logs = []
    bm25 = ev.load_or_build_bm25(tmp_path / "bm25", TEXTS, source, logs.append)
    assert any("unreadable BM25 index" in m for m in logs) and any("indexed" in m for m in logs)
    assert bm25.num_chunks == len(TEXTS)


def test_oracle_puts_labelled_chunks_first_and_counts_fallbacks():
    retrieved = np.array([[1, 7, 2], [4, 5, 6], [9, 1, 2]])
    ids, fallback = ev.oracle_chunk_ids([[7], [], [3, 9, 11, 12]], retrieved)
    assert ids.tolist() == [[7, 1, 2], [4, 5, 6], [3, 9, 11]]
    assert fallback == 1


def test_generation_metrics_max_over_aliases():
    preds = ["the Paris", "Lyon", "new york city"]
    answers = [["Paris"], ["Marseille", "Lyon"], ["New York"]]
    m = ev.generation_metrics(preds, answers)
    assert m["em"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx((1 + 1 + 0.8) / 3)
    assert [s["em"] for s in ev.score_predictions(preds, answers)] == [1.0, 1.0, 0.0]


def test_new_run_dirs_are_unique(tmp_path):
    a = ev.new_run_dir(tmp_path, "test", "0123456789abcdef", "dense")
    b = ev.new_run_dir(tmp_path, "test", "0123456789abcdef", "dense")
    assert a != b and a.is_dir() and b.is_dir() and a.name.startswith("test-01234567-dense-")


# ---------------------------------------------------------------- on a tiny trained run

TINY = ["--corpus_size", "40", "--vocab_size", "400", "--dim", "32", "--num_blocks", "1", "--num_heads", "2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A dataset, a retriever and a generator trained for a few steps each, through the real command line."""
    import main

    save_dir = tmp_path_factory.mktemp("tiny") / "run"
    rc = main.main(
        [
            "--target",
            "all",
            "--save_dir",
            str(save_dir),
            *TINY,
            "--batch_size",
            "8",
            "--num_iters",
            "20",
            "--retriever_iters",
            "20",
            "--steps_per_eval",
            "20",
            "--steps_per_report",
            "20",
        ]
    )
    assert rc == 0
    return save_dir


def _read_run(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    return report, rows


def test_eval_target_writes_consistent_files(tiny_run, capsys):
    import main
    from datasets import Dataset

    rc = main.main(["--target", "eval", "--save_dir", str(tiny_run), *TINY, "--retriever", "bm25", "--top_k", "3"])
    assert rc == 0
    (run_dir,) = [d for d in (tiny_run / "eval").iterdir() if d.name.startswith("test-")]  # the other test: valid-
    assert "-bm25-" in run_dir.name
    report, rows = _read_run(run_dir)
    data = Dataset(tiny_run / "dataset")
    n = len(data.split_indices("test"))
    assert n > 0 and len(rows) == n == report["config"]["num_questions"]
    assert report["config"]["top_k"] == 3 and report["config"]["retriever"] == "bm25"
    for r in rows:
        assert [c["chunk"] for c in r["retrieved"]] == r["bm25_ranked"][:3]  # --retriever bm25 feeds the generator
        assert len(r["dense_ranked"]) == len(r["bm25_ranked"]) == report["config"]["depth"]
        gold = r["labelled_chunks"][:3]
        assert r["oracle"]["chunks"][: len(gold)] == gold and len(r["oracle"]["chunks"]) == 3
    md = (run_dir / "report.md").read_text()
    assert md.count("| dense |") == 2 and md.count("| BM25 |") == 2 and "| oracle (labelled chunks) |" in md
    assert "| BM25 | answer in chunk |" in capsys.readouterr().out
    assert report["config"]["dense_index"] == "exact" and "searching an exact index" in md
    assert (tiny_run / "bm25" / data.tokenizer_sha1[:12] / ev.BM25_SOURCE).is_file()


def test_report_says_when_dense_search_was_approximate():
    cfg = {"dense_index": "faiss"}
    assert ev.dense_index_phrase(cfg) == "n approximate (faiss)" and ev.dense_index_phrase({}) == "n exact"


def test_report_equals_recomputation_from_predictions(tiny_run, monkeypatch):
    """With a stand-in reader that answers exactly when a fed chunk holds the answer, EM on retrieved chunks
    must equal answer-based Recall@top_k; every number must also follow from predictions.jsonl alone."""
    import main
    import pipeline
    from datasets import Dataset

    def perfect_reader(model, data, question_ids, chunk_ids, **kw):
        out = []
        for q, row in zip(question_ids, chunk_ids):
            answers = data.qa[int(q)]["answers"]
            out.append(answers[0] if any(contains_answer(data.chunk_text(int(c)), answers) for c in row) else "no idea")
        return out

    monkeypatch.setattr(ev, "generate_answers", perfect_reader)
    args = main.build_parser().parse_args(
        ["--save_dir", str(tiny_run), *TINY, "--split", "valid", "--top_k", "5", "--seed", "3"]
    )
    data = Dataset(tiny_run / "dataset")
    retr, rid, index = pipeline.get_retriever(args, data, train=False)
    report, paths = ev.run_eval(
        args, data, retr, index, None, retriever_id=rid, generator_id="f" * 40, log=lambda _: None
    )
    assert report == json.loads(paths["json"].read_text())
    _, rows = _read_run(paths["json"].parent)
    assert len(rows) == len(data.split_indices("valid"))

    g, dense = report["generation"], report["retrieval"]["dense"]
    assert g["retrieved"]["em"] == pytest.approx(dense["answer"]["recall@5"])
    assert 0 < g["retrieved"]["em"] < 1  # the check above is not vacuous
    for setting, field in (("retrieved", None), ("oracle", "oracle"), ("random", "random")):
        preds = [(r if field is None else r[field])["prediction"] for r in rows]
        em = np.mean([exact_match(p, r["answers"]) for p, r in zip(preds, rows)])
        f1 = np.mean([token_f1(p, r["answers"]) for p, r in zip(preds, rows)])
        assert g[setting]["em"] == pytest.approx(em) and g[setting]["f1"] == pytest.approx(f1)
        assert np.mean([(r if field is None else r[field])["em"] for r in rows]) == pytest.approx(em)

    texts = {}
    for name in ("dense", "bm25"):
        ranked = np.array([r[f"{name}_ranked"] for r in rows])
        relevant = [
            [c for c in row if contains_answer(texts.setdefault(c, data.chunk_text(c)), r["answers"])]
            for row, r in zip(ranked.tolist(), rows)
        ]
        for k, v in recall_at_k(ranked, relevant, ks=ev.KS).items():
            assert report["retrieval"][name]["answer"][f"recall@{k}"] == pytest.approx(v)
        for k, v in recall_at_k(ranked, [r["labelled_chunks"] for r in rows], ks=ev.KS).items():
            assert report["retrieval"][name]["labels"][f"recall@{k}"] == pytest.approx(v)
        assert [r[f"{name}_first_hit"] for r in rows] == [
            ev.first_hit_rank(row, rel) for row, rel in zip(ranked, relevant)
        ]
    assert [[c["chunk"] for c in r["retrieved"]] for r in rows] == [r["dense_ranked"][:5] for r in rows]
    assert [r["labelled_chunks"] for r in rows] == [
        data.positives(int(i)).tolist() for i in data.split_indices("valid")
    ]


def test_eval_without_checkpoints_is_a_usage_error(tiny_run, tmp_path, capsys):
    import main

    rc = main.main(["--target", "eval", "--save_dir", str(tmp_path), "--to_dir", str(tiny_run / "dataset"), *TINY])
    assert rc == 2
    assert "no retriever checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()
    fresh = tmp_path / "fresh"  # and before a dataset is built for nothing
    assert main.main(["--target", "eval", "--save_dir", str(fresh), *TINY]) == 2
    assert "no retriever checkpoint" in capsys.readouterr().err and not (fresh / "dataset").exists()
