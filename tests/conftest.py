"""Test set-up: the project's flat modules on the import path, a fast BLAS for MLX when one exists, and MLX's
graph ordering wide enough for cores.py.

Loading OpenBLAS (after fastpath's GEMV forwarder) with RTLD_GLOBAL before MLX makes MLX's BLAS calls resolve to
them in this process (the same effect as main.py's LD_PRELOAD re-exec, without re-starting pytest); results are the
same to float rounding."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fastpath  # noqa: E402
import jit  # noqa: E402

if sys.platform.startswith("linux") and os.environ.get("RAGMLX_FAST_BLAS") != "0" and "mlx.core" not in sys.modules:
    _forward = fastpath.build_gemv_forward()
    _blas = fastpath.find_fast_blas(with_prefixed=_forward is not None)
    if _blas:  # with the GEMV forwarder first where needed, as main.py's re-exec preloads them
        fastpath.load_blas_in_process(_blas, _forward)

# As main.py does on the CPU before MLX evaluates anything (see cores.py).
import cores  # noqa: E402

cores.widen_graph_order()
# MLX's kernel builds for the tests' mx.compile calls, ~4x faster (Linux with g++; elsewhere nothing happens).
jit.precompile_kernel_header()


@pytest.fixture
def streams():
    """`cores.configure` for one test (how many CPU streams `map_rows` uses), then what was configured before."""
    before = cores.count()
    yield cores.configure
    cores.configure(before)
