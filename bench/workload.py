"""The benchmark's workload, shared by both of its processes (bench/run.py's MLX side and bench/torch_worker.py):
the shapes and sizes, the synthetic batches, the positions and FLOPs a training step computes, and how a call is
timed, so that both sides measure the same thing the same way."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VOCAB, CONTEXT, BATCH, QLEN, K_PASSAGES, ANSWER_LEN = 10_000, 64, 32, 16, 5, 16
SIZES = {"small": dict(dim=256, num_blocks=4, num_heads=4), "large": dict(dim=1024, num_blocks=4, num_heads=8)}


def seconds(fn: Callable[[], object], steps: int = 1) -> float:
    """Seconds per call of `fn` (which must block until its work is done), over `steps` calls."""
    tic = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - tic) / steps


def make_batches(kind: str, seed: int = 0) -> dict:
    """Synthetic numpy batches of the benchmark shapes, with PAD tails as real batches have."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def rows(n, width, min_len):
        t = rng.integers(4, VOCAB, size=(n, width), dtype=np.int32)
        t[np.arange(width)[None, :] >= rng.integers(min_len, width + 1, size=n)[:, None]] = 0
        return t

    if kind == "retriever":
        mask = np.eye(BATCH, 2 * BATCH, dtype=bool) | (rng.random((BATCH, 2 * BATCH)) < 0.02)
        return {"questions": rows(BATCH, QLEN, 6), "chunks": rows(2 * BATCH, CONTEXT, 40), "positive_mask": mask}
    q = rows(BATCH, QLEN, 6)
    c = rows(BATCH * K_PASSAGES, CONTEXT, 40).reshape(BATCH, K_PASSAGES, CONTEXT)
    sep = np.full((BATCH, K_PASSAGES, 1), 3, dtype=np.int32)  # EOS between question and chunk
    passages = np.concatenate([np.broadcast_to(q[:, None], (BATCH, K_PASSAGES, QLEN)), sep, c], axis=2)
    answers = rows(BATCH, ANSWER_LEN, 2)
    answer_in = np.concatenate([np.full((BATCH, 1), 2, np.int32), answers[:, :-1]], axis=1)  # BOS + answer
    return {"passages": np.ascontiguousarray(passages), "answer_in": answer_in, "answer_out": answers}


def embed_chunks(n: int):
    chunks = make_batches("retriever")["chunks"]
    return chunks[[i % len(chunks) for i in range(n)]]


def batch_tokens(kind: str) -> int:
    """Positions processed per training step, padding included (the compute is dense)."""
    if kind == "retriever":
        return BATCH * QLEN + 2 * BATCH * CONTEXT
    return BATCH * K_PASSAGES * (QLEN + 1 + CONTEXT) + BATCH * ANSWER_LEN


def train_flops(kind: str, dim: int, num_blocks: int, num_heads: int) -> float:
    """Matmul FLOPs of one training step (3 x forward) as both frameworks compute it: 6 x weights per token for the
    position-wise layers, plus attention, the cross-attention and copy pointer with the memory's projections folded
    in (no product per memory position with their weights), and the tied output projection."""

    def encoder(n_seqs, L):
        return n_seqs * num_blocks * (24 * L * dim * dim + 4 * L * L * dim)

    if kind == "retriever":
        return 3.0 * (encoder(BATCH, QLEN) + encoder(2 * BATCH, CONTEXT) + 2 * 3 * BATCH * dim * 128)
    Lp, T = QLEN + 1 + CONTEXT, ANSWER_LEN
    S = K_PASSAGES * Lp
    # Decoder block: self-attn 8TD^2 and its scores 4T^2D, MLP 16TD^2; the cross-attention as both sides compute it,
    # with the memory's key/value projections folded in (layers.CrossAttention): q/out 4TD^2, the fold into the
    # queries and out of the read memory 4TD^2, scores and reads over the memory for each head 4HTSD. The pointer:
    # q 2TD^2, its key projection folded in 2TD^2, scores 2TSD.
    per_block = 32 * T * dim * dim + 4 * T * T * dim + 4 * num_heads * T * S * dim
    pointer = 4 * T * dim * dim + 2 * T * S * dim
    fwd = encoder(BATCH * K_PASSAGES, Lp) + BATCH * (num_blocks * per_block + 2 * T * dim * VOCAB + pointer)
    return 3.0 * fwd


def real_token_fraction(batch_np: dict) -> float:
    """The share of the batch's encoder positions that are not padding (what a packed step computes)."""
    rows = [v for k, v in batch_np.items() if k in ("questions", "chunks", "passages")]
    return sum(int((r != 0).sum()) for r in rows) / sum(r.size for r in rows)
