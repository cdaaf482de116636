"""ragmlx: train a small retrieval-augmented generation system end to end on MLX.

    python main.py --target dataset|retriever|all|eval [--inference] [flags]

`main.py` only parses flags and dispatches; each stage lives in its own module and takes explicit arguments.
"""

from __future__ import annotations

import argparse
import os
import sys

TARGETS = ("none", "dataset", "retriever", "all", "eval")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for flags whose None means "from the checkpoint" (their help says the default)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:  # not 0: --seed, --temperature... show theirs
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """A bad flag is one line on stderr, `error: ...` and exit code 2, like every other input error (argparse
    prints its whole usage first); `--help` still shows it."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="Train and query a from-scratch RAG pipeline (retriever + Fusion-in-Decoder generator) on MLX.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("what to run")
    g.add_argument(
        "--target",
        choices=TARGETS,
        default="all",
        help="stage to run; each runs (or reuses) the stages before it (eval: the dataset, then the trained models)",
    )
    g.add_argument(
        "--inference",
        action="store_true",
        help="interactive questions against the trained models instead of training "
        "(--target retriever: retrieval only)",
    )
    g.add_argument("--save_dir", default="./runs/default", help="folder for the dataset cache, checkpoints and indexes")
    g.add_argument("--seed", type=int, default=0, help="seed for the corpus, batches and initialisation")
    g.add_argument("--gpu", action="store_true", help="run on the GPU (Metal on macOS, CUDA with mlx[cuda])")
    g.add_argument(
        "--no_fast_blas",
        action="store_true",
        help="do not re-start with a fast BLAS on Linux (also RAGMLX_FAST_BLAS=0)",
    )
    g.add_argument(
        "--compile",
        choices=("auto", "yes", "no"),
        default="auto",
        help="mx.compile the training step; auto = on the GPU, and on the CPU when g++ is on PATH (MLX's JIT)",
    )

    g.add_argument(
        "--cpu_streams",
        type=int,
        default=0,
        help="on the CPU, split each training and embedding batch (and a batch of generated answers) over "
        "this many MLX streams, one core each (0 = one per core, up to 8; 1 = off)",
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        choices=("builtin", "triviaqa", "triviaqa-hf", "squad", "folder"),
        default="builtin",
        help="corpus: the generated built-in encyclopedia, TriviaQA rc (directory or HF hub), "
        "SQuAD JSON, or a folder of .txt/.md files with qa.jsonl",
    )
    g.add_argument("--from_dir", default=None, help="where --data reads from (a directory, or the SQuAD JSON file)")
    g.add_argument("--to_dir", default=None, help="where the prepared dataset is cached (default: SAVE_DIR/dataset)")
    g.add_argument("--corpus_size", type=int, default=2000, help="documents in the built-in corpus")
    g.add_argument(
        "--squad_documents",
        choices=("articles", "paragraphs"),
        default="articles",
        help="SQuAD: one document per article or per paragraph",
    )
    g.add_argument("--max_questions", type=int, default=None, help="read at most this many questions (real data)")
    g.add_argument("--context_size", type=int, default=64, help="tokens per chunk")
    g.add_argument("--vocab_size", type=int, default=4096, help="SentencePiece BPE vocabulary size")
    g.add_argument(
        "--expand_answers",
        action="store_true",
        help="train the generator to answer in full sentences: --expander_model rewrites each short "
        "answer as one (cached in the dataset folder; EM/F1 still use the short answers)",
    )
    g.add_argument(
        "--expander_model", default=None, help="mlx_lm model for --expand_answers: a local folder or a Hugging Face id"
    )

    g = p.add_argument_group("models (default: taken from the checkpoint when resuming)")
    g.add_argument("--num_blocks", type=int, default=None, help="transformer blocks per encoder/decoder [2]")
    g.add_argument("--dim", type=int, default=None, help="model width [128]")
    g.add_argument("--num_heads", type=int, default=None, help="attention heads [4]")
    g.add_argument(
        "--checkpoint", action="store_true", default=None, help="gradient checkpointing (less memory, more compute)"
    )

    g = p.add_argument_group("training (default: taken from the checkpoint when resuming)")
    g.add_argument("--batch_size", type=int, default=None, help="questions per step [32]")
    g.add_argument("--num_iters", type=int, default=None, help="generator training steps [400]")
    g.add_argument("--retriever_iters", type=int, default=None, help="retriever training steps [400]")
    g.add_argument("--learning_rate", type=float, default=None, help="peak learning rate [1e-3]")
    g.add_argument("--weight_decay", type=float, default=None, help="AdamW weight decay [0.01]")
    g.add_argument("--lr_warmup", type=int, default=None, help="linear warm-up steps [100]")
    g.add_argument("--steps_per_report", type=int, default=None, help="steps between training reports [50]")
    g.add_argument("--steps_per_eval", type=int, default=None, help="steps between evaluations and checkpoints [200]")
    g.add_argument("--keep", type=int, default=None, help="checkpoints of each type to keep [3]")
    g.add_argument("--new_model", action="store_true", help="start fresh instead of resuming the newest checkpoint")
    g.add_argument("--identifier", default=None, help="generator checkpoint id (or prefix) to resume or use")
    g.add_argument("--retriever_identifier", default=None, help="retriever checkpoint id (or prefix) to resume or use")
    g.add_argument(
        "--embedding_identifier",
        default=None,
        help="chunk-embedding cache id to use (default: the one built for the retriever)",
    )
    g.add_argument(
        "--eval_chunks",
        type=int,
        default=200_000,
        help="the retriever's in-training evaluation scores against all chunks up to this many, else against this "
        "many in all: the labelled ones filled up with a fixed random sample (optimistic; the final index is whole)",
    )
    g.add_argument(
        "--local_negatives",
        action="store_true",
        help="under mlx.launch: score each rank's questions against its own chunks only, not the "
        "chunks of the whole global batch",
    )
    g.add_argument(
        "--visualisation",
        action="store_true",
        help="at each evaluation, show a sample question, its retrieved chunks and the answer",
    )

    g = p.add_argument_group("retrieval and decoding")
    g.add_argument("--top_k", type=int, default=5, help="chunks retrieved per question (fed to the generator)")
    g.add_argument(
        "--index",
        choices=("exact", "faiss", "usearch"),
        default="exact",
        help="dense search: exact top-K, or an approximate index (faiss IVF / usearch HNSW, pip "
        "install faiss-cpu or usearch) built from the cached embeddings, recall vs exact logged",
    )
    g.add_argument(
        "--retriever",
        choices=("dense", "bm25"),
        default="dense",
        help="which retriever feeds the generator (--target eval)",
    )
    g.add_argument("--split", choices=("valid", "test"), default="test", help="question split --target eval reports on")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature for answers (0 = greedy)")
    g.add_argument("--sample_top_k", type=int, default=0, help="sample only among this many likeliest tokens (0 = all)")
    g.add_argument("--max_answer_tokens", type=int, default=None, help="longest generated answer, in tokens")
    return p


def open_closed_standard_streams() -> None:
    """Put /dev/null on whichever of descriptors 0-2 the caller closed (`<&-`): MLX takes a file it opens as
    descriptor 0 for a failed open, so every checkpoint read as corrupt and training started over."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one
            setattr(sys, name, open(fd, mode, closefd=False))


def main(argv: list[str] | None = None, fast_blas: bool = False) -> int:
    """Parse `argv` and run the target; returns the exit code (2 for bad input, with a one-line message).

    `fast_blas` (command line only) may re-start this process with a fast BLAS preloaded on Linux."""
    open_closed_standard_streams()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    import cores

    if not args.gpu:  # before MLX evaluates anything (it reads this once)
        cores.widen_graph_order()
    import pipeline

    try:
        if fast_blas and not args.no_fast_blas:
            import fastpath

            try:
                print(fastpath.ensure_fast_blas(sys.argv), flush=True)
            except ValueError as e:  # RAGMLX_BLAS names an unusable library
                raise pipeline.training.UsageError(str(e)) from None
        elif fast_blas:  # opted out: the first line still names the BLAS
            import fastpath

            print(fastpath.fast_blas_disabled("--no_fast_blas"), flush=True)
        return pipeline.run(args)
    except pipeline.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused (a full disk, permissions, a file where a folder should be)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except pipeline.training.Stopped:  # a Ctrl+C in a training loop, which saved its last step and said so
        return 130
    except KeyboardInterrupt:  # anywhere else
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(fast_blas=True))
