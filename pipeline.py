"""The orchestration behind main.py: each target runs (or reuses) the stages before it."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

import checkpoint
import cores
import datasets
import distributed as dist
import readers
import training

# Errors caused by the user's input or files: one line on stderr and exit code 2, never a traceback.
USER_ERRORS = (training.UsageError, datasets.DatasetError, checkpoint.CheckpointError, readers.DataError)

# Training defaults for flags that default to None on the command line (None = "take it from the checkpoint").
# Model defaults live in each model's ModelArgs.
TRAIN_DEFAULTS = {
    "learning_rate": 1e-3,
    "weight_decay": 0.01,
    "lr_warmup": 100,
    "steps_per_report": 50,
    "steps_per_eval": 200,
    "keep": 3,
}
# Per model. The generator trains on 32 questions a step: a step of 32 takes ~1.8x a step of 16 (larger GEMMs) and
# learns more than two of them. Built-in corpus, two seeds, same retriever and chunks (README "Results"): 400 steps
# of 32 reach a lower validation loss than 800 steps of 16 (1.640 / 1.770 vs 1.886 / 1.845) in ~0.85x the
# generator stage's time; 300 steps of 32 were worse on one seed (2.002).
STAGE_DEFAULTS = {"retriever": {"num_iters": 400, "batch_size": 32}, "generator": {"num_iters": 400, "batch_size": 32}}


def setup_runtime(args: argparse.Namespace) -> None:
    """Device, memory reuse, CPU streams, compilation and seed."""
    import fastpath
    import jit
    import mlx.core as mx

    if args.gpu:
        if not (mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())):
            raise training.UsageError(
                "--gpu: this MLX build has no GPU backend (install mlx on macOS or mlx[cuda] on Linux)"
            )
        mx.set_default_device(mx.gpu)
    else:
        mx.set_default_device(mx.cpu)
        fastpath.keep_freed_memory()
    try:
        cores.configure(1 if args.gpu else getattr(args, "cpu_streams", 0))
    except ValueError as e:
        raise training.UsageError(str(e)) from None
    # auto: on the GPU, and on the CPU where g++ is there for MLX's JIT (with the step spread over the cores,
    # compiling it measured 1.08-1.17x faster; the main command 4:32 vs 5:03).
    have_gxx = jit.compiler_available()
    args.use_compile = args.compile == "yes" or (args.compile == "auto" and (args.gpu or have_gxx))
    if not args.gpu and args.compile != "no":
        if have_gxx:
            jit.precompile_kernel_header()  # once per kernel cache: later kernel builds ~4x faster
        else:
            print(jit.compiler_message())
    if not 0 <= args.seed < 2**64:
        raise training.UsageError(f"--seed must be in [0, 2^64), got {args.seed}")
    mx.random.seed(args.seed)


def train_overrides(args, iters: int | None) -> dict:
    keys = ("batch_size", "learning_rate", "weight_decay", "lr_warmup", "steps_per_report", "steps_per_eval", "keep")
    out = {k: getattr(args, k) for k in keys}
    out["num_iters"] = iters
    out["seed"] = args.seed
    return out


def model_overrides(args) -> dict:
    return {"dim": args.dim, "num_blocks": args.num_blocks, "num_heads": args.num_heads, "checkpoint": args.checkpoint}


def prepare_dataset(args):
    import datasets

    expand, expander = getattr(args, "expand_answers", False), getattr(args, "expander_model", None)
    if expand and not expander:
        raise training.UsageError("--expand_answers needs --expander_model (a local mlx_lm folder or a HF model id)")
    if expander and not expand:
        raise training.UsageError("--expander_model is used only with --expand_answers; add it or drop the model")
    if expander and Path(expander).is_dir():  # a local model: known by its folder, not by a path relative to here
        expander = str(Path(expander).resolve())
    spec = datasets.SourceSpec(
        args.data,
        args.from_dir,
        args.corpus_size,
        args.seed,
        args.squad_documents,
        args.max_questions,
        expander_model=expander if expand else None,
    )
    to_dir = Path(args.to_dir) if args.to_dir else Path(args.save_dir) / "dataset"
    if args.batch_size is not None and args.batch_size <= 0:
        raise training.UsageError(f"--batch_size must be positive, got {args.batch_size}")
    # Under mlx.launch rank 0 builds first; the others then find it built (shared folder) or build their own.
    if dist.is_main():
        datasets.build_dataset(spec, to_dir, args.vocab_size, args.context_size)
    dist.barrier()
    if not dist.is_main():
        datasets.build_dataset(spec, to_dir, args.vocab_size, args.context_size)
    return datasets.Dataset(to_dir)


def checkpoint_dir(args) -> Path:
    return Path(args.save_dir) / "checkpoints"


def get_retriever(args, data, train: bool):
    """Train/resume the retriever (or only load it), then its cached chunk index."""
    import index as chunk_index
    import retriever

    directory = checkpoint_dir(args)
    if train:
        model, rid, embedded = retriever.train(
            data,
            directory,
            train_overrides(args, args.retriever_iters),
            model_overrides(args),
            args.retriever_identifier,
            args.new_model,
            train_defaults("retriever"),
            visualisation=args.visualisation,
            compile=args.use_compile,
            local_negatives=getattr(args, "local_negatives", False),
            eval_chunks=getattr(args, "eval_chunks", 200_000),
        )
    else:
        model, rid = load_trained(directory, "retriever", retriever, data, args.retriever_identifier, "retriever")
        embedded = None
    index = chunk_index.load_or_build(
        model,
        rid,
        data.chunks,
        directory,
        embedding_identifier=args.embedding_identifier,
        kind=getattr(args, "index", "exact"),
        embeddings=embedded,
    )
    return model, rid, index


def train_defaults(ckpt_type: str) -> dict:
    """A fresh model's training flags that the command line leaves out. A resumed one takes them from its
    checkpoint's saved train config instead (explicit flags still win), whatever else the folder holds."""
    return dict(TRAIN_DEFAULTS, **STAGE_DEFAULTS[ckpt_type])


def retrieve(model, data, index, k: int, ids: np.ndarray | None = None, batch_size: int = 512):
    """Top-k chunk scores and ids for the questions `ids` (default: every question), in batches."""
    import index as chunk_index

    questions = data.questions if ids is None else data.questions[ids]
    return chunk_index.search(chunk_index.embed(model, questions, batch_size=batch_size), index, k)


def random_chunks(data, n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 3]).integers(0, len(data.chunks), size=(n, k))


def get_generator(args, data, retrieved, rid, train: bool):
    import generator

    directory = checkpoint_dir(args)
    overrides = dict(model_overrides(args), num_decoder_blocks=args.num_blocks)
    if args.max_answer_tokens is not None:
        overrides["max_answer_tokens"] = args.max_answer_tokens
    if train:
        model, gid = generator.train(
            data,
            directory,
            retrieved,
            train_overrides(args, args.num_iters),
            overrides,
            rid,
            args.identifier,
            args.new_model,
            train_defaults("generator"),
            visualisation=args.visualisation,
            compile=args.use_compile,
        )
        return model, gid
    model, gid = load_trained(directory, "generator", generator, data, args.identifier, "all")
    warn_if_trained_on_another_retriever(checkpoint.read_metadata(directory, "generator", gid), rid)
    return model, gid


def warn_if_trained_on_another_retriever(generator_meta: dict, retriever_id: str, log=print) -> None:
    """Say so when a trained generator is fed by another retriever than the one whose chunks it learned from."""
    trained_on, gid = generator_meta.get("retriever"), str(generator_meta.get("id", ""))
    if isinstance(trained_on, str) and trained_on != retriever_id:
        log(
            f"warning: generator {gid[:12]} was trained on retriever {trained_on[:12]}'s chunks, not "
            f"{retriever_id[:12]}'s (--retriever_identifier {trained_on[:12]} uses that one)"
        )


def load_trained(directory, ckpt_type: str, module, data, identifier: str | None, target: str):
    """A trained model for inference or evaluation: (model, checkpoint id), or a usage error if there is none."""
    model_cls = module.Retriever if ckpt_type == "retriever" else module.Generator
    model, found = training.load_or_init(
        directory, ckpt_type, model_cls, module.ModelArgs, {"vocab_size": data.vocab_size}, {},
        data.tokenizer_sha1, identifier, False, verb="using",
    )  # fmt: skip
    if found is None:
        raise training.UsageError(f"no {ckpt_type} checkpoint in {directory}: train one with --target {target}")
    return model, found.id


def summarise(args, data, retr, index, gen, split: str = "test", max_questions: int = 1000) -> dict:
    """Retrieval Recall@K / MRR and generator EM / F1 on a split, with retrieved and with random chunks."""
    import generator
    import index as chunk_index
    from metrics import recall_at_k

    ids = data.split_indices(split)[:max_questions]
    if len(ids) == 0:
        print(f"no {split} questions to report on")
        return {}
    answerable = ids[data.pos_offsets[ids + 1] > data.pos_offsets[ids]]
    report = {
        f"retrieval_{k}": v for k, v in chunk_index.evaluate(retr, data, answerable, index, ks=(1, 5, 20)).items()
    }
    relevant = [set(data.positives(int(i)).tolist()) for i in answerable]
    report["random_recall@5"] = recall_at_k(random_chunks(data, len(answerable), 5, args.seed), relevant, ks=(5,))[5]
    if gen is not None:
        _, top = retrieve(retr, data, index, args.top_k, ids)
        em_r, _ = generator.evaluate_answers(gen, data, ids, top, loss=False)
        em_x, _ = generator.evaluate_answers(
            gen, data, ids, random_chunks(data, len(ids), top.shape[1], args.seed), loss=False
        )
        report.update(
            {"em_retrieved": em_r["em"], "f1_retrieved": em_r["f1"], "em_random": em_x["em"], "f1_random": em_x["f1"]}
        )
    total = len(data.split_indices(split))
    which = (
        f"{len(ids)} questions" if len(ids) == total else f"the first {len(ids):,} of {total:,} (--target eval: all)"
    )
    print(f"\n{split} set ({which}, {len(answerable)} with an answer chunk):")
    for k, v in report.items():
        print(f"  {k:<20} {v:.3f}")
    return report


def show_samples(data, retr, index, gen, args, n: int = 3) -> None:
    """A few test questions with their retrieved chunks and generated answers."""
    import generator

    ids = data.split_indices("test")[:n]
    if len(ids) == 0:
        return
    scores, top = retrieve(retr, data, index, args.top_k, ids)
    answers = generator.greedy_answers(gen, generator.build_passages(data, data.questions[ids], top))
    for i, q in enumerate(ids):
        qa = data.qa[int(q)]
        print(f"\nQ: {qa['question']}")
        for s, c in zip(scores[i][:3], top[i][:3]):
            print(f"   {s:.3f} [{data.chunk_title(int(c))}] {data.chunk_text(int(c))[:90]}...")
        print(f"A: {data.decode(answers[i])}   (gold: {qa['answers'][0]})")


class StageClock:
    """Wall seconds of a run's stages, for the line it ends with (`bench/run.py` reads it)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = now - self.last
        self.last = now

    def summary(self) -> str:
        stages = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.stages.items())
        return f"done in {self.last - self.start:.0f}s ({stages})"


def check_flags(args: argparse.Namespace) -> None:
    """Flags that argparse cannot check alone, before any work: a one-line UsageError naming the flag."""
    if args.inference and args.target not in ("retriever", "all"):
        raise training.UsageError(f"--inference works with --target retriever or all, not {args.target}")
    save_dir = Path(args.save_dir)
    if save_dir.exists() and not save_dir.is_dir():
        raise training.UsageError(f"--save_dir {save_dir}: exists and is not a folder")
    # The folder this run writes in, found unusable now rather than after a model trained (--inference only reads;
    # the dataset's folder is checked by datasets.build_dataset, and only when it must be built).
    writes = {"retriever": checkpoint_dir(args), "all": checkpoint_dir(args), "eval": save_dir / "eval"}.get(
        args.target
    )
    if writes is not None and not args.inference and (problem := checkpoint.unwritable(writes)):
        raise training.UsageError(f"--save_dir {save_dir}: {problem}")
    if getattr(args, "data", "builtin") == "builtin":  # the generated corpus reads nothing: say so, not ignore it
        for flag in ("from_dir", "max_questions"):
            if getattr(args, flag, None) is not None:
                raise training.UsageError(f"--{flag} is for real data (--data triviaqa, squad, folder...); "
                                          "the built-in corpus is generated (--corpus_size sets its size)")  # fmt: skip
    if args.top_k <= 0:
        raise training.UsageError(f"--top_k must be positive, got {args.top_k}")
    if getattr(args, "eval_chunks", 1) <= 0:
        raise training.UsageError(f"--eval_chunks must be positive, got {args.eval_chunks}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise training.UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.sample_top_k < 0:
        raise training.UsageError(f"--sample_top_k must be >= 0 (0 = all tokens), got {args.sample_top_k}")
    if args.sample_top_k > 0 and args.temperature == 0:
        raise training.UsageError("--sample_top_k needs --temperature > 0 (at 0 answers are decoded greedily)")
    if args.max_answer_tokens is not None and args.max_answer_tokens < 1:
        raise training.UsageError(f"--max_answer_tokens must be positive, got {args.max_answer_tokens}")
    if args.new_model and args.identifier is not None and args.target == "all" and not args.inference:
        # here, not after a fresh retriever has trained and pruned the folder's older ones
        raise training.UsageError(
            f"--new_model starts a fresh generator; it cannot also resume --identifier {args.identifier}"
        )
    if args.target == "eval":  # before building a dataset that nothing could then evaluate
        import evaluation

        evaluation.require_checkpoints(checkpoint_dir(args))
    # The checkpoints and index named now, not after the retriever stage has trained, saved and pruned.
    if args.identifier is not None and args.target == "all":
        checkpoint.resolve_id(checkpoint_dir(args), "generator", args.identifier)
    if getattr(args, "embedding_identifier", None) and args.target in ("retriever", "all"):
        checkpoint.resolve_id(checkpoint_dir(args), "embedding", args.embedding_identifier, "--embedding_identifier")
    for flag in ("retriever_iters", "num_iters"):  # the training config calls both "num_iters"
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise training.UsageError(f"--{flag} must be positive, got {getattr(args, flag)}")


def run(args: argparse.Namespace) -> int:
    check_flags(args)
    setup_runtime(args)
    if dist.size() > 1:
        if args.inference or args.target == "eval":
            raise training.UsageError("--inference and --target eval run in one process, not under mlx.launch")
        if not dist.is_main():
            sys.stdout = open(os.devnull, "w")  # only rank 0 prints (errors still reach stderr)
    if args.target == "none":
        return 0
    clock = StageClock()
    data = prepare_dataset(args)
    clock.lap("dataset")
    if args.target == "dataset":
        print(clock.summary())
        return 0
    if args.target == "eval":
        import evaluation

        return evaluation.eval_target(args, data)
    train = not args.inference
    retr, rid, index = get_retriever(args, data, train)
    clock.lap("retriever")
    if args.target == "retriever":
        if args.inference:
            import inference

            return inference.loop(data, retr, index, None, args)
        summarise(args, data, retr, index, None)
        clock.lap("test")
        print(f"\n{clock.summary()}")
        return 0
    _, retrieved = retrieve(retr, data, index, args.top_k)
    gen, _ = get_generator(args, data, retrieved, rid, train)
    clock.lap("generator")
    if not dist.is_main():  # samples and test metrics: rank 0 only
        return 0
    if args.inference:
        import inference

        return inference.loop(data, retr, index, gen, args)
    show_samples(data, retr, index, gen, args)
    summarise(args, data, retr, index, gen)
    clock.lap("test")
    print(f"\n{clock.summary()}")
    return 0
