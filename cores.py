"""Spread row-independent work over the CPU's cores with MLX streams.

MLX's CPU backend runs each stream's ops on a thread of its own, and its elementwise kernels use one core: with
one stream, everything but the BLAS calls runs on one core. `map_rows` splits a batch's rows into one slice per
stream and builds each slice's graph on its own stream, so the slices run at once, elementwise work included.
The math is unchanged: the same ops on the same rows, concatenated; backward ops run on the stream of their
forward op, so the backward pass is spread too, and each weight's gradient is the sum over the slices.

While spread, the BLAS runs one thread per call (each stream's matmuls already use one core; OpenBLAS's own
threads would fight the streams for the same cores). MLX orders a graph's ops breadth-first only up to a width
(`MLX_BFS_MAX_WIDTH`, default 20, read once, at the first evaluation) and depth-first beyond it, which would run
the slices one after the other; `widen_graph_order` must run before anything is evaluated.

`mx.compile` first simplifies a traced graph: it merges equal scalar constants, then ops with the same inputs,
without looking at their streams. The slices' graphs have the same shapes, so the broadcasts of a constant (an
epsilon, a polynomial coefficient) on every stream merge into the first stream's; the fused kernels of the other
streams then read it as a full-size strided input and run the slow strided loops. `configure` with 2 or more
streams turns that simplification off for the rest of the process (MLX's own `no_simplify` compile mode; fusion
stays on; MLX reads the mode when it traces a function): the generator's training step 6-9% faster on 2 cores (a
spread softmax forward and backward 20%), the same losses and gradients bit for bit. The real fix is upstream: a
simplification that merges only ops on one stream.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

MAX_AUTO_STREAMS = 8


def widen_graph_order(environ=os.environ) -> None:
    """Let MLX schedule 1,000 ops breadth-first (default 20) unless the user chose a width. MLX reads the
    variable once, at the first evaluation, so call this first; a re-exec'd process inherits it."""
    environ.setdefault("MLX_BFS_MAX_WIDTH", "1000")


class _State:
    streams: list = []
    n = 1
    active = False


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def configure(n: int = 0) -> int:
    """Use `n` CPU streams (0: one per available core, at most 8; 1: no spreading). Returns the number used."""
    if n < 0:
        raise ValueError(f"--cpu_streams must be >= 0, got {n}")
    n = n or min(available_cores(), MAX_AUTO_STREAMS)
    if n > 1:
        keep_streams_apart_in_compile()
    while len(_State.streams) < n:  # streams (and their threads) are created once and reused
        _State.streams.append(mx.new_stream(mx.cpu))
    _State.n = n
    return n


# mlx::core::set_compile_mode(CompileMode) from MLX's C++ API (mlx/compile.h), which Python does not bind, and
# two values of its enum (disabled, no_simplify, no_fuse, enabled).
_SET_COMPILE_MODE = "_ZN3mlx4core16set_compile_modeENS0_11CompileModeE"
NO_SIMPLIFY, ENABLED = 1, 3


def set_compile_mode(mode: int) -> bool:
    """Set MLX's compile mode through its C++ library; False when no library exports the function."""
    for path in sorted(glob.glob(os.path.join(os.path.dirname(mx.__file__), "lib", "libmlx.*"))):
        try:
            set_mode = getattr(ctypes.CDLL(path), _SET_COMPILE_MODE)
        except (OSError, AttributeError):
            continue
        set_mode.argtypes, set_mode.restype = [ctypes.c_int], None
        set_mode(mode)
        return True
    return False


@functools.cache  # once per process
def keep_streams_apart_in_compile() -> bool:
    """Compile without MLX's graph simplification, so that constants stay on each stream's own kernels (see the
    module's docstring). Skipped when MLX_DISABLE_COMPILE is set, to any value, as MLX reads it (compiling must
    stay off); returns whether the mode was set."""
    return "MLX_DISABLE_COMPILE" not in os.environ and set_compile_mode(NO_SIMPLIFY)


def count() -> int:
    """Streams `map_rows` uses inside `spread` (1 until `configure` is called)."""
    return _State.n


@functools.cache  # looked up once, not at every step
def _blas_threads_functions():
    """(get, set) for the BLAS in this process: OpenBLAS or MKL; None when it has no such control."""
    lib = ctypes.CDLL(None)  # the global scope: LD_PRELOADed libraries are there
    names = (
        ("openblas_get_num_threads", "openblas_set_num_threads"),
        ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),  # the scipy-openblas32 wheel
        ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads"),
    )
    for get, set_ in names:
        try:
            return getattr(lib, get), getattr(lib, set_)
        except AttributeError:
            continue
    return None


@contextmanager
def spread():
    """Inside, `map_rows` splits work over the configured streams and the BLAS uses one thread per call."""
    if not spreads() or _State.active:
        yield
        return
    blas = _blas_threads_functions()
    previous = blas[0]() if blas else None
    if blas:
        blas[1](1)
    _State.active = True
    try:
        yield
    finally:
        _State.active = False
        if blas:
            blas[1](previous)


def _slices(rows: int, parts: int) -> list[slice]:
    bounds = [rows * i // parts for i in range(parts + 1)]
    return [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]


def row_parts(rows: int) -> list[tuple[mx.Stream, slice]]:
    """How `map_rows` splits `rows` rows: inside `spread`, one contiguous slice per stream (at most one per row);
    otherwise every row on the default stream. For work that keeps per-slice state between calls (decoding
    with a cache), call it inside `spread` and evaluate each later call inside `spread` too."""
    parts = min(count(), rows) if _State.active else 1
    if parts < 2:
        return [(mx.default_stream(mx.default_device()), slice(0, rows))]
    return list(zip(_State.streams, _slices(rows, parts)))


def spreads() -> bool:
    """Whether `spread` splits work here: 2 or more streams and the CPU as the default device."""
    return count() >= 2 and mx.default_device() == mx.cpu


def spread_row_slices(rows: int, spreading: bool | None = None) -> list[slice]:
    """The row slices `map_rows` will use inside `spread` (`spreading`: `spreads()`, which a thread other than
    the one that set the default device should be given), for per-slice data made on the host (`PerPart`)."""
    spreading = spreads() if spreading is None else spreading
    return _slices(rows, max(1, min(count(), rows)) if spreading else 1)  # 0 rows: one empty slice


@dataclass(frozen=True)
class PerPart:
    """A `map_rows` argument with one value per row slice (such as host-made index arrays: `layers.Packing`),
    given to each slice's call as is instead of being cut by rows; `values` None gives every slice None."""

    values: list | None


def take_rows(value, rows: slice):
    """`value[rows]` for an array, field by field for a NamedTuple of arrays (such as the generator's Memory)."""
    if hasattr(value, "_fields"):
        return type(value)(*(field[rows] for field in value))
    return value[rows]


def map_rows(fn: Callable, *arrays):
    """`fn(*arrays)` with the rows (axis 0) of every array (or NamedTuple of arrays) split into one slice per
    stream inside `spread` (a `PerPart` argument gives each slice its own value); the outputs (an array or a tuple
    of arrays, each with the rows along axis 0) are concatenated back. Outside `spread`, or with fewer rows than
    two, exactly `fn(*arrays)`. The first argument must be an array (or NamedTuple of arrays)."""
    first = arrays[0][0] if hasattr(arrays[0], "_fields") else arrays[0]
    parts = row_parts(first.shape[0])
    for a in arrays:
        if isinstance(a, PerPart) and a.values is not None and len(a.values) != len(parts):
            raise ValueError(f"{len(a.values)} per-part values for {len(parts)} row slices")

    def part(a, j: int, rows: slice):
        if isinstance(a, PerPart):
            return None if a.values is None else a.values[j]
        return a if len(parts) < 2 else take_rows(a, rows)

    if len(parts) < 2:
        return fn(*(part(a, 0, parts[0][1]) for a in arrays))
    outs = []
    for j, (stream, rows) in enumerate(parts):
        with mx.stream(stream):
            outs.append(fn(*(part(a, j, rows) for a in arrays)))
    if isinstance(outs[0], mx.array):
        return mx.concatenate(outs, axis=0)
    merged = [mx.concatenate(column, axis=0) for column in zip(*outs)]
    return type(outs[0])(*merged) if hasattr(outs[0], "_fields") else tuple(merged)
