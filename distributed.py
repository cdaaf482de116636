"""Data parallelism on MLX's own `mx.distributed`: who am I, my share of a global batch, and the collectives.

Launch N processes with `mlx.launch -n N --backend ring python main.py ...` (CPU, TCP; several Macs with
`--hostfile`) or `--backend nccl` on CUDA machines. Without a launcher `mx.distributed.init()` returns a group of
size 1 and every helper here is a no-op, so the single-process path is the same code and costs nothing.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import mlx.core as mx
import numpy as np


@lru_cache(maxsize=1)
def world() -> tuple[mx.distributed.Group, int, int]:
    """(group, rank, size) of this process; size 1 when not started by `mlx.launch`.

    Cached: `init()` connects the ring once per process and every later call must see the same group."""
    group = mx.distributed.init()
    return group, group.rank(), group.size()


def rank() -> int:
    return world()[1]


def size() -> int:
    return world()[2]


def is_main() -> bool:
    """True on rank 0, the only process that logs, saves checkpoints and writes shared files."""
    return world()[1] == 0


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s contiguous share of `n` rows; shares differ by at most one row."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside a world of size {size}")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(rows, rank: int, size: int):
    """`rank`'s disjoint contiguous rows of a global batch (numpy or mx array, or a list of ids).

    Uneven sizes are allowed here (for indexing); training requires equal shares, see `check_divisible`."""
    start, stop = shard_bounds(len(rows), rank, size)
    return rows[start:stop]


def check_divisible(n: int, what: str, size: int) -> None:
    """Training shards must be equal so that the mean of per-rank means is the global mean."""
    if n % size:
        raise ValueError(f"{what} {n} is not divisible by the {size} processes; pick a multiple of {size}")


def all_sum(x: mx.array) -> mx.array:
    """Sum over ranks (identity when alone), evaluated at once (see `all_gather_rows`)."""
    if size() == 1:
        return x
    out = mx.distributed.all_sum(x)
    mx.eval(out)
    return out


def all_sum_in_graph(x: mx.array) -> mx.array:
    """Sum over ranks as a node of the graph being built (identity when alone), for a training step's loss:
    inside a compiled or differentiated function `all_sum` could not evaluate. Its place in the step's graph is
    the same on every rank, before the gradient averaging that depends on it."""
    return x if size() == 1 else mx.distributed.all_sum(x)


def all_gather_rows(x: mx.array) -> mx.array:
    """Concatenate every rank's rows in rank order (identity when alone). Rows may differ in number per rank
    (the ring all_gather needs equal shapes, so shorter shards are padded and the padding is dropped)."""
    if size() == 1:
        return x
    counts = mx.distributed.all_gather(mx.array([x.shape[0]], dtype=mx.int32))
    counts = [int(c) for c in np.array(counts)]
    longest = max(counts)
    if x.shape[0] < longest:
        x = mx.concatenate([x, mx.zeros((longest - x.shape[0], *x.shape[1:]), dtype=x.dtype)])
    # Evaluated here: ring collectives must run in the same order on every rank, and a lazy result evaluated
    # later next to another collective (a barrier, say) would deadlock.
    gathered = mx.distributed.all_gather(x)
    mx.eval(gathered)
    if all(c == longest for c in counts):
        return gathered
    return mx.concatenate([gathered[r * longest : r * longest + c] for r, c in enumerate(counts)])


def gather_with_grad(x: mx.array) -> mx.array:
    """all_gather of equal-sized row blocks whose gradient is complete across ranks.

    MLX's own vjp of all_gather returns only this rank's slice of this rank's cotangent, so the terms that other
    ranks' losses contribute through our rows would be lost. Here the vjp sums the cotangents over ranks
    (all_sum; the ring backend has no reduce-scatter) and keeps our slice: with per-rank mean losses and
    averaged gradients this is exactly the gradient of the global-batch loss."""
    if size() == 1:
        return x
    return _gather_with_grad(x)


@mx.custom_function
def _gather_with_grad(x):
    return mx.distributed.all_gather(x)


@_gather_with_grad.vjp
def _gather_with_grad_vjp(primals, cotangent, output):
    n = primals.shape[0]
    r = rank()
    return mx.distributed.all_sum(cotangent)[r * n : (r + 1) * n]


def any_flag(flag: bool) -> bool:
    """True if any rank's flag is set (e.g. a Ctrl+C that reached only one process); no communication alone."""
    if size() == 1:
        return bool(flag)
    return mx.distributed.all_sum(mx.array([1 if flag else 0], dtype=mx.int32)).item() > 0


def agree(value: int, what: str) -> None:
    """Fail on every rank if the ranks disagree on an integer (e.g. the step they resume from)."""
    if size() == 1:
        return
    values = np.array(mx.distributed.all_gather(mx.array([value], dtype=mx.int32))).tolist()
    if len(set(values)) > 1:
        raise ValueError(
            f"the {size()} processes disagree on {what} ({values} by rank); "
            f"they must all see the same --save_dir (a shared or synced folder)"
        )


def barrier() -> None:
    """Wait until every rank gets here (a tiny all_sum)."""
    if size() > 1:
        mx.eval(mx.distributed.all_sum(mx.zeros(1)))


def broadcast(arrays: Sequence[mx.array]) -> list[mx.array]:
    """Rank 0's values of `arrays` on every rank (all_sum of rank 0's values and zeros elsewhere)."""
    if size() == 1:
        return list(arrays)
    out = [mx.distributed.all_sum(a if is_main() else mx.zeros_like(a)) for a in arrays]
    mx.eval(out)
    return out


def broadcast_text(text: str | None) -> str | None:
    """Rank 0's string (e.g. the id of the checkpoint only it saved) on every rank; None stays None."""
    if size() == 1:
        return text
    mine = text.encode() if is_main() and text is not None else None  # only rank 0's values count
    (length,) = broadcast([mx.array([-1 if mine is None else len(mine)], dtype=mx.int32)])
    n = int(length.item())
    if n < 0:
        return None
    payload = np.frombuffer(mine, dtype=np.uint8).astype(np.int32) if is_main() else np.zeros(n, np.int32)
    (chars,) = broadcast([mx.array(payload)])
    return bytes(np.array(chars).astype(np.uint8)).decode()
