"""Tests for fastpath: when to re-exec with a fast BLAS preloaded, and how the BLAS in use is detected."""

from __future__ import annotations

import os
import platform
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastpath
import jit
from helpers import mlx_lib_dir

ROOT = Path(__file__).resolve().parent.parent
FAKE_LIB = "/opt/fake/libopenblas.so.0"


class FakeExec:
    """Records execve calls instead of replacing the process."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], dict[str, str]]] = []

    def __call__(self, path: str, args: list[str], env: dict[str, str]) -> None:
        self.calls.append((path, list(args), dict(env)))


@pytest.fixture
def slow_linux(monkeypatch):
    """Pretend this is Linux with MLX on the reference BLAS, a fast BLAS at FAKE_LIB and no GEMV forwarder."""
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(fastpath, "uses_reference_blas", lambda: True)
    monkeypatch.setattr(fastpath, "build_gemv_forward", lambda env=None, cache_dir=None: None)
    monkeypatch.setattr(fastpath, "gemv_forwarding_active", lambda: False)
    monkeypatch.setattr(fastpath, "find_fast_blas", lambda env=None: FAKE_LIB)


def test_reexecs_with_preload_when_reference_blas(slow_linux):
    execv, env = FakeExec(), {"PATH": "/usr/bin", "HOME": "/root"}
    fastpath.ensure_fast_blas(["main.py", "--target", "all"], env=env, execv=execv)
    assert len(execv.calls) == 1
    path, args, new_env = execv.calls[0]
    assert path == sys.executable
    assert args == [sys.executable, "main.py", "--target", "all"]
    assert new_env["LD_PRELOAD"] == FAKE_LIB
    assert new_env["RAGMLX_REEXEC"] == "1"
    assert new_env["PATH"] == "/usr/bin"
    assert "LD_PRELOAD" not in env, "the caller's environment must not be mutated"


def test_existing_preload_is_kept_after_ours(slow_linux):
    execv = FakeExec()
    fastpath.ensure_fast_blas(["main.py"], env={"LD_PRELOAD": "/x/libjemalloc.so"}, execv=execv)
    assert execv.calls[0][2]["LD_PRELOAD"] == f"{FAKE_LIB}:/x/libjemalloc.so"


def test_no_reexec_loop_when_already_reexeced(slow_linux):
    execv = FakeExec()
    message = fastpath.ensure_fast_blas(["main.py"], env={"RAGMLX_REEXEC": "1", "LD_PRELOAD": FAKE_LIB}, execv=execv)
    assert execv.calls == []
    assert message.startswith("BLAS: reference") and "did not take effect" in message


def test_opt_out_env_var(slow_linux):
    execv = FakeExec()
    message = fastpath.ensure_fast_blas(["main.py"], env={"RAGMLX_FAST_BLAS": "0"}, execv=execv)
    assert execv.calls == []
    assert "disabled by RAGMLX_FAST_BLAS=0" in message


def test_no_fast_blas_found_returns_slow_message(slow_linux, monkeypatch):
    monkeypatch.setattr(fastpath, "find_fast_blas", lambda env=None: None)
    execv = FakeExec()
    message = fastpath.ensure_fast_blas(["main.py"], env={}, execv=execv)
    assert execv.calls == []
    assert "reference netlib BLAS (slow" in message and "libopenblas0-pthread" in message


def test_no_reexec_when_fast_blas_already_in_use(slow_linux, monkeypatch):
    monkeypatch.setattr(fastpath, "uses_reference_blas", lambda: False)
    monkeypatch.setattr(fastpath, "mlx_blas_library", lambda: FAKE_LIB)
    execv = FakeExec()
    message = fastpath.ensure_fast_blas(["main.py"], env={"RAGMLX_REEXEC": "1"}, execv=execv)
    assert execv.calls == []
    assert message == f"BLAS: OpenBLAS ({FAKE_LIB}, preloaded)"


def test_macos_never_reexecs_and_is_not_reference(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(fastpath, "find_fast_blas", lambda env=None: FAKE_LIB)
    execv = FakeExec()
    assert fastpath.ensure_fast_blas(["main.py"], env={}, execv=execv) == "BLAS: Accelerate (macOS)"
    assert execv.calls == []
    # The real check must not be fooled by this Linux process's maps.
    assert fastpath.uses_reference_blas() is False
    assert fastpath.blas_in_use() == "Accelerate (macOS)"
    assert jit.compiler_available() is True


def test_explicit_blas_path_errors_name_the_variable(tmp_path):
    with pytest.raises(ValueError, match="RAGMLX_BLAS=.*no such file"):
        fastpath.find_fast_blas({"RAGMLX_BLAS": str(tmp_path / "missing.so")})
    not_elf = tmp_path / "libblas.so"
    not_elf.write_bytes(b"not an ELF file")
    with pytest.raises(ValueError, match="does not export cblas_sgemm"):
        fastpath.find_fast_blas({"RAGMLX_BLAS": str(not_elf)})


def test_symbol_reader_sees_defined_not_imported_symbols():
    libmlx = mlx_lib_dir() / "libmlx.so"
    if not libmlx.exists():
        pytest.skip("mlx is not the Linux wheel layout (no mlx/lib/libmlx.so)")
    # libmlx.so imports cblas_sgemm, so it must not count as exporting it.
    assert "cblas_sgemm" not in fastpath.exported_symbols(str(libmlx))
    bundled = sorted((mlx_lib_dir().parent.parent / "mlx_cpu.libs").glob("libblas-*.so*"))
    if bundled:
        assert fastpath.is_usable_blas(str(bundled[0]))
        assert fastpath.classify_blas(str(bundled[0])) == "reference netlib BLAS"


def test_numpy_scipy_openblas_is_not_preloadable():
    import numpy

    libs = sorted((Path(numpy.__file__).resolve().parent.parent / "numpy.libs").glob("libscipy_openblas*.so*"))
    if not libs:
        pytest.skip("this numpy wheel bundles no scipy_openblas")
    # Prefixed names (scipy_cblas_sgemm64_) cannot stand in for the cblas_sgemm MLX imports.
    assert not fastpath.is_usable_blas(str(libs[0]))


@pytest.mark.parametrize(
    "path, name",
    [
        ("/nonexistent/x86_64-linux-gnu/openblas-pthread/libblas.so.3", "OpenBLAS"),
        ("/nonexistent/lib/libopenblas.so.0", "OpenBLAS"),
        ("/nonexistent/venv/lib/libmkl_rt.so.2", "MKL"),
        ("/nonexistent/x86_64-linux-gnu/blas/libblas.so.3", "reference netlib BLAS"),
        ("/nonexistent/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0", "reference netlib BLAS"),
    ],
)
def test_classify_blas(path, name):
    assert fastpath.classify_blas(path) == name


def _clean_env() -> dict[str, str]:
    drop = {"LD_PRELOAD", "RAGMLX_REEXEC", "RAGMLX_FAST_BLAS", "RAGMLX_BLAS", "RAGMLX_GEMV_FORWARD", "RAGMLX_PRELOADED"}
    drop |= {"RAGMLX_BLAS_PREFIX"}
    return {k: v for k, v in os.environ.items() if k not in drop}


SNIPPET = (
    "import sys, fastpath\n"
    "print(fastpath.ensure_fast_blas(sys.argv))\n"
    "print(sys.argv[1:])\n"
    "print(fastpath.blas_in_use())\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS re-exec only happens on Linux")
def test_real_reexec_loads_fast_blas():
    env = _clean_env()
    lib = fastpath.find_fast_blas(env)
    if lib is None:
        pytest.skip("no fast BLAS here (pip install scipy-openblas32, or apt-get install libopenblas0-pthread)")
    out = subprocess.run(
        [sys.executable, "-c", SNIPPET, "--flag", "value"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    message, args, in_use = out.stdout.strip().splitlines()[-3:]
    assert args == "['--flag', 'value']", "the re-exec must keep `-c CODE` and the arguments"
    assert fastpath.classify_blas(lib) in in_use and "reference" not in in_use  # the BLAS, not the forwarder
    assert ", preloaded" in message
    assert ("matrix-vector products as GEMV" in in_use) == (fastpath.build_gemv_forward(env) is not None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS re-exec only happens on Linux")
def test_real_opt_out_keeps_bundled_blas():
    bundled = sorted((mlx_lib_dir().parent.parent / "mlx_cpu.libs").glob("libblas-*.so*"))
    if not bundled:
        pytest.skip("this mlx build does not bundle the reference BLAS")
    env = dict(_clean_env(), RAGMLX_FAST_BLAS="0")
    out = subprocess.run([sys.executable, "-c", SNIPPET], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    message, _args, in_use = out.stdout.strip().splitlines()[-3:]
    assert "disabled by RAGMLX_FAST_BLAS=0" in message
    assert in_use.startswith("reference netlib BLAS") and "mlx_cpu.libs" in in_use


def test_gemv_forwarder_is_preloaded_before_the_blas_unless_opted_out(slow_linux, monkeypatch):
    forwarder = "/cache/libragmlx_gemv_forward-abc.so"
    monkeypatch.setattr(fastpath, "build_gemv_forward", lambda env=None, cache_dir=None: forwarder)
    execv = FakeExec()
    fastpath.ensure_fast_blas(["main.py"], env={"LD_PRELOAD": "/x/libjemalloc.so"}, execv=execv)
    new_env = execv.calls[0][2]
    assert new_env["LD_PRELOAD"] == f"{forwarder}:{FAKE_LIB}:/x/libjemalloc.so"
    assert new_env["RAGMLX_PRELOADED"] == f"{forwarder}:{FAKE_LIB}"
    execv = FakeExec()
    fastpath.ensure_fast_blas(["main.py"], env={"RAGMLX_GEMV_FORWARD": "0"}, execv=execv)
    assert execv.calls[0][2]["LD_PRELOAD"] == FAKE_LIB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the forwarder is preloaded on Linux only")
def test_gemv_forwarder_builds_once_and_needs_a_compiler(tmp_path, monkeypatch):
    first = fastpath.build_gemv_forward(cache_dir=tmp_path)
    if first is None:
        pytest.skip("no C compiler here")
    assert os.path.basename(first).startswith("libragmlx_gemv_forward-") and fastpath.is_usable_blas(first) is False

    def no_compiling(*args, **kwargs):
        raise AssertionError("the cached library must be reused")

    monkeypatch.setattr(fastpath.subprocess, "run", no_compiling)
    assert fastpath.build_gemv_forward(cache_dir=tmp_path) == first
    monkeypatch.setattr(fastpath.shutil, "which", lambda name: None)
    assert fastpath.build_gemv_forward(cache_dir=tmp_path) == first, "a built library needs no compiler to reuse"
    assert fastpath.build_gemv_forward(cache_dir=tmp_path / "other") is None


def test_gemv_forwarder_gives_the_blas_products():
    """Every matrix-vector shape MLX can send (row or column vector, either operand transposed, strided rows,
    batched, addmm's alpha and beta) against float64 numpy; output buffers that held NaN just before."""
    if not fastpath.gemv_forwarding_active():
        pytest.skip("MLX's cblas_sgemm does not go through the forwarder in this process")
    import mlx.core as mx

    rng = np.random.default_rng(0)
    cases = []
    for m, k, n in [(1, 64, 405), (1, 405, 64), (7, 33, 1), (1, 1, 5), (1, 3, 1), (300, 257, 1)]:
        for trans_a in (False, True):
            for trans_b in (False, True):
                a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
                b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
                cases.append(
                    (
                        a.T if trans_a else a,
                        b.T if trans_b else b,
                        mx.array(a).T if trans_a else mx.array(a),
                        mx.array(b).T if trans_b else mx.array(b),
                    )
                )
    wide = rng.standard_normal((50, 80)).astype(np.float32)  # rows of a wider matrix: lda > k
    cases.append((wide[:1, :40], wide[:40, 3:4], mx.array(wide)[:1, :40], mx.array(wide)[:40, 3:4]))
    for a, b, a_mx, b_mx in cases:
        shape = (a.shape[0], b.shape[1])
        mx.eval(mx.full(shape, float("nan")))  # a freed NaN buffer of the output's size, for reuse
        got = np.array(a_mx @ b_mx)
        assert np.allclose(got, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4), (a.shape, b.shape)
    q, keys = (
        rng.standard_normal((6, 4, 1, 32)).astype(np.float32),
        rng.standard_normal((6, 4, 50, 32)).astype(np.float32),
    )
    got = np.array(mx.array(q) @ mx.array(keys).swapaxes(-1, -2))
    assert np.allclose(got, np.einsum("bhid,bhjd->bhij", q.astype(np.float64), keys), rtol=1e-4, atol=1e-4)
    c, x, w = (rng.standard_normal(s).astype(np.float32) for s in ((1, 30), (1, 20), (20, 30)))
    got = np.array(mx.addmm(mx.array(c), mx.array(x), mx.array(w), alpha=0.5, beta=2.0))
    assert np.allclose(got, 2.0 * c + 0.5 * (x.astype(np.float64) @ w), rtol=1e-4, atol=1e-4)


def test_failed_exec_is_reported_not_raised(slow_linux):
    def broken_exec(path, args, env):
        raise PermissionError(13, "Permission denied")

    message = fastpath.ensure_fast_blas(["main.py"], env={}, execv=broken_exec)
    assert message.startswith("BLAS: reference netlib BLAS (slow; re-exec with") and "Permission denied" in message


def test_truncated_library_is_not_usable(tmp_path):
    truncated = tmp_path / "libopenblas.so.0"
    # A 64-bit ELF header whose section table (3 entries of 64 bytes at offset 4096) lies past the end.
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, 4096)
    struct.pack_into("<HH", header, 0x3A, 64, 3)
    truncated.write_bytes(bytes(header))
    assert fastpath.is_usable_blas(str(truncated)) is False


FREE_AND_REUSE = """
import resource, sys
import numpy as np
import fastpath
if sys.argv[1] == "keep":
    fastpath.keep_freed_memory()
def cycle():
    # 60 x 5 MiB (heap-sized blocks), written, then freed: 300 MiB, more than glibc's largest default trim
    blocks = [np.ones(5 << 18, np.float32) for _ in range(60)]
    del blocks
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_stops_freed_buffers_faulting_back_in():
    root = Path(fastpath.__file__).parent

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FREE_AND_REUSE, mode], cwd=root, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    default, kept = faults("default"), faults("keep")
    assert default > 50_000  # glibc returned the blocks and faulted hundreds of MiB of fresh pages back in
    assert kept < default / 20


AVX512 = frozenset({"fpu", "sse2", "avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})


@pytest.mark.parametrize(
    "core, env, flags, hinted",
    [
        ("Haswell", {"OPENBLAS_CORETYPE": "Haswell"}, AVX512, True),  # forced below what the CPU can do
        ("Zen", {"OPENBLAS_CORETYPE": "zen"}, AVX512, True),
        ("Haswell", {}, AVX512, False),  # OpenBLAS's own choice: nothing to say
        ("Cooperlake", {"OPENBLAS_CORETYPE": "Cooperlake"}, AVX512, False),
        ("Haswell", {"OPENBLAS_CORETYPE": "Haswell"}, AVX512 - {"avx512bw"}, False),  # not every part the kernels use
        ("Haswell", {"OPENBLAS_CORETYPE": "Haswell"}, frozenset({"avx2", "fma"}), False),  # an AVX2 CPU
        (None, {"OPENBLAS_CORETYPE": "Haswell"}, AVX512, False),  # MKL or another BLAS
    ],
)
def test_forced_kernels_hint(core, env, flags, hinted):
    hint = fastpath.forced_kernels_hint(core, env, flags)
    assert (hint is not None) == hinted
    if hinted:
        assert f"OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']}" in hint and "unset it" in hint


def test_cpu_flags_reads_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx512f avx2\n\nflags : ignored\n")
    assert fastpath.cpu_flags(str(cpuinfo)) == {"fpu", "sse2", "avx512f", "avx2"}
    assert fastpath.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_blas_line_names_the_kernels_and_the_forced_set(slow_linux, monkeypatch):
    monkeypatch.setattr(fastpath, "uses_reference_blas", lambda: False)
    monkeypatch.setattr(fastpath, "mlx_blas_library", lambda: FAKE_LIB)
    monkeypatch.setattr(fastpath, "openblas_core", lambda path: "Haswell")
    monkeypatch.setattr(fastpath, "cpu_flags", lambda: AVX512)
    execv = FakeExec()
    plain = fastpath.ensure_fast_blas(["main.py"], env={"RAGMLX_REEXEC": "1"}, execv=execv)
    assert plain == f"BLAS: OpenBLAS ({FAKE_LIB}, preloaded, Haswell kernels)"
    forced = fastpath.ensure_fast_blas(["main.py"], env={"OPENBLAS_CORETYPE": "Haswell"}, execv=execv)
    assert forced.startswith(f"BLAS: OpenBLAS ({FAKE_LIB}, Haswell kernels); OPENBLAS_CORETYPE=Haswell keeps")
    assert execv.calls == [], "the user's OPENBLAS_CORETYPE is reported, never overridden"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS's CPU dispatch")
def test_openblas_core_names_the_forced_kernels():
    lib = fastpath.find_fast_blas(_clean_env())
    if lib is None or fastpath.classify_blas(lib) != "OpenBLAS":
        pytest.skip("no OpenBLAS on this machine")
    code = "import sys, fastpath; print(fastpath.openblas_core(sys.argv[1]))"
    env = dict(_clean_env(), OPENBLAS_CORETYPE="Haswell")
    out = subprocess.run([sys.executable, "-c", code, lib], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Haswell"
    assert fastpath.openblas_core("/nonexistent/libopenblas.so.0") is None
    assert fastpath.openblas_core("libc.so.6") is None  # a library without openblas_get_corename


PIP_OPENBLAS = next(iter(fastpath._pip_openblas_candidates()), None)
needs_pip_openblas = pytest.mark.skipif(
    not sys.platform.startswith("linux") or PIP_OPENBLAS is None, reason="needs the scipy-openblas32 wheel on Linux"
)


@needs_pip_openblas
def test_blas_prefix_tells_plain_prefixed_and_other_libraries(tmp_path):
    assert fastpath.blas_prefix(PIP_OPENBLAS) == "scipy_" and fastpath.is_usable_blas(PIP_OPENBLAS) is False
    system = fastpath.find_fast_blas({}, with_prefixed=False)
    if system is not None:
        assert fastpath.blas_prefix(system) == ""
    forwarder = fastpath.build_gemv_forward(cache_dir=tmp_path)
    if forwarder is not None:  # defines cblas_sgemm only: not a BLAS
        assert fastpath.blas_prefix(forwarder) is None
    (tmp_path / "empty.so").write_bytes(b"")
    assert fastpath.blas_prefix(str(tmp_path / "empty.so")) is None


@needs_pip_openblas
def test_pip_openblas_is_the_last_resort_and_needs_the_forwarder(monkeypatch):
    monkeypatch.setattr(fastpath, "_OPENBLAS_PATHS", ())
    monkeypatch.setattr(fastpath, "_ldconfig_openblas", lambda: [])
    monkeypatch.setattr(fastpath, "_mkl_candidates", lambda: [])
    assert fastpath.find_fast_blas({}) == PIP_OPENBLAS
    assert fastpath.find_fast_blas({}, with_prefixed=False) is None
    assert fastpath.find_fast_blas({"RAGMLX_BLAS": PIP_OPENBLAS}) == PIP_OPENBLAS  # an explicit prefixed one is fine

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(fastpath, "uses_reference_blas", lambda: True)
    forwarder = "/cache/libragmlx_gemv_forward-abc.so"
    monkeypatch.setattr(fastpath, "build_gemv_forward", lambda env=None, cache_dir=None: forwarder)
    for env in ({}, {"RAGMLX_GEMV_FORWARD": "0"}):  # opted out of GEMV, the forwarder still carries the names
        execv = FakeExec()
        fastpath.ensure_fast_blas(["main.py"], env=env, execv=execv)
        new_env = execv.calls[0][2]
        assert new_env["LD_PRELOAD"] == f"{forwarder}:{PIP_OPENBLAS}" and new_env["RAGMLX_BLAS_PREFIX"] == "scipy_"
        assert new_env.get("RAGMLX_GEMV_FORWARD") == env.get("RAGMLX_GEMV_FORWARD")
    monkeypatch.setattr(fastpath, "build_gemv_forward", lambda env=None, cache_dir=None: None)
    monkeypatch.setattr(fastpath, "_c_compiler", lambda: None)
    execv = FakeExec()
    message = fastpath.ensure_fast_blas(["main.py"], env={}, execv=execv)
    assert not execv.calls and "slow" in message and "C compiler" in message
    # A plain BLAS never inherits a prefix a parent process set.
    monkeypatch.setattr(fastpath, "find_fast_blas", lambda env=None, with_prefixed=True: FAKE_LIB)
    monkeypatch.setattr(fastpath, "blas_prefix", lambda path: "")
    execv = FakeExec()
    fastpath.ensure_fast_blas(["main.py"], env={"RAGMLX_BLAS_PREFIX": "scipy_"}, execv=execv)
    assert "RAGMLX_BLAS_PREFIX" not in execv.calls[0][2]


_PIP_CHILD = """
import sys, numpy as np, fastpath
print(fastpath.ensure_fast_blas(sys.argv))
import mlx.core as mx, cores
rng = np.random.default_rng(0)
worst = 0.0
for m, k, n in [(300, 200, 100), (1, 64, 405), (405, 64, 1), (16, 256, 1000)]:
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    got = np.array(mx.array(a) @ mx.array(b))
    worst = max(worst, float(np.abs(got - a.astype(np.float64) @ b).max()))
print(worst, cores._blas_threads_functions() is not None)
print(fastpath.blas_in_use())
"""


@needs_pip_openblas
def test_real_reexec_with_the_pip_openblas():
    if fastpath.build_gemv_forward() is None:
        pytest.skip("no C compiler here")
    for extra in ({}, {"RAGMLX_GEMV_FORWARD": "0"}):
        env = {**_clean_env(), "RAGMLX_BLAS": PIP_OPENBLAS, "PYTHONPATH": str(ROOT), **extra}
        out = subprocess.run([sys.executable, "-c", _PIP_CHILD], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        message, checks, in_use = out.stdout.strip().splitlines()[-3:]
        worst, threads = checks.split()
        assert float(worst) < 1e-3 and threads == "True"  # products right; spread() can set its thread count
        assert in_use.startswith(f"OpenBLAS ({PIP_OPENBLAS}") and ", preloaded" in message
        assert ("matrix-vector products as GEMV" in in_use) == (not extra)


REAL_USES_REFERENCE_BLAS = fastpath.uses_reference_blas
# The CBLAS entry points MLX imports, as empty functions: enough for the symbol checks, never called.
TINY_BLAS = "void cblas_sgemm(void) {}\nvoid cblas_dgemm(void) {}\nvoid cblas_cgemm(void) {}\n"
OPENBLAS_MARK = 'const char *openblas_get_corename(void) { return "Tiny"; }\n'


def _build_library(path: Path, source: str, *flags: str) -> Path:
    """`source` compiled with the C compiler into the shared library `path`; skips the test without a compiler."""
    compiler = fastpath._c_compiler()
    if compiler is None or not sys.platform.startswith("linux"):
        pytest.skip("needs a C compiler on Linux")
    path.parent.mkdir(parents=True, exist_ok=True)
    c_file = path.with_name(path.name + ".c")
    c_file.write_text(source)
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(path), str(c_file), *flags], check=True, capture_output=True
    )
    return path


def test_blas_with_an_unknown_name_is_judged_by_its_marker_functions(tmp_path):
    renamed = _build_library(tmp_path / "libmyblas.so", TINY_BLAS + OPENBLAS_MARK)
    assert fastpath.classify_blas(str(renamed)) == "OpenBLAS"
    mkl = _build_library(tmp_path / "libvendor.so", TINY_BLAS + "int MKL_Get_Max_Threads(void) { return 1; }\n")
    assert fastpath.classify_blas(str(mkl)) == "MKL"
    prefixed = _build_library(tmp_path / "libx.so", 'const char *scipy_openblas_get_corename(void) { return ""; }\n')
    assert fastpath.classify_blas(str(prefixed)) == "OpenBLAS"
    netlib = _build_library(tmp_path / "libblas.so", TINY_BLAS)  # no marker: a reference BLAS
    assert fastpath.classify_blas(str(netlib)) == "reference netlib BLAS"
    bundled = tmp_path / "mlx_cpu.libs" / "libblas-0123abcd.so.3"  # MLX's own, whatever it exports
    bundled.parent.mkdir()
    bundled.write_bytes(renamed.read_bytes())
    assert fastpath.classify_blas(str(bundled)) == "reference netlib BLAS"


def test_a_fast_blas_the_user_chose_under_another_name_is_kept_and_reported(slow_linux, monkeypatch, tmp_path):
    renamed = str(_build_library(tmp_path / "libmyblas.so", TINY_BLAS + OPENBLAS_MARK))
    monkeypatch.setattr(fastpath, "uses_reference_blas", REAL_USES_REFERENCE_BLAS)
    monkeypatch.setattr(fastpath, "mlx_blas_library", lambda: renamed)
    execv = FakeExec()
    preloaded_by_user = fastpath.ensure_fast_blas(["main.py"], env={"LD_PRELOAD": renamed}, execv=execv)
    assert execv.calls == [], "a fast BLAS the user preloaded must not be overridden"
    assert preloaded_by_user == f"BLAS: OpenBLAS ({renamed}, Tiny kernels)"
    env = {"RAGMLX_BLAS": renamed, "RAGMLX_REEXEC": "1", "LD_PRELOAD": renamed}  # after the re-exec RAGMLX_BLAS made
    assert (
        fastpath.ensure_fast_blas(["main.py"], env=env, execv=execv)
        == f"BLAS: OpenBLAS ({renamed}, preloaded, Tiny kernels)"
    )
    assert execv.calls == []


def test_explicit_blas_that_cannot_load_is_refused_before_the_reexec(tmp_path, monkeypatch):
    dependency = _build_library(tmp_path / "libdep.so", "void dep_fn(void) {}\n")
    source = "void dep_fn(void);\n" + TINY_BLAS.replace("cblas_sgemm(void) {}", "cblas_sgemm(void) { dep_fn(); }")
    library = _build_library(tmp_path / "libfakeblas.so", source, f"-L{tmp_path}", "-ldep")
    dependency.unlink()  # the re-executed interpreter would die in ld.so (exit 127) before saying anything
    with pytest.raises(ValueError, match=r"RAGMLX_BLAS=.*libfakeblas.so: cannot be loaded \(.*libdep.so"):
        fastpath.find_fast_blas({"RAGMLX_BLAS": str(library)})
    loads = _build_library(tmp_path / "libgood.so", TINY_BLAS)
    monkeypatch.chdir(tmp_path)
    assert fastpath.find_fast_blas({"RAGMLX_BLAS": "libgood.so"}) == str(loads)  # absolute: ld.so reads no cwd


@pytest.fixture
def private_tmp(monkeypatch, tmp_path):
    """A temporary folder of the test's own (tempfile.gettempdir()), for the per-user fallback cache folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(fastpath.tempfile, "tempdir", str(tmp))
    return tmp


def test_paths_with_spaces_or_colons_are_preloaded_through_links(slow_linux, monkeypatch, tmp_path, private_tmp):
    forwarder = tmp_path / "cache dir" / "ragmlx" / "libragmlx_gemv_forward-abc.so"
    blas = tmp_path / "my project:1" / ".venv" / "libopenblas.so.0"
    for library in (forwarder, blas):
        library.parent.mkdir(parents=True)
        library.write_bytes(b"")
    monkeypatch.setattr(fastpath, "build_gemv_forward", lambda env=None, cache_dir=None: str(forwarder))
    monkeypatch.setattr(fastpath, "find_fast_blas", lambda env=None: str(blas))
    links = private_tmp / f"ragmlx-{os.getuid()}"  # the cache folder's own path has a space: the fallback
    for cache, folder in ((tmp_path / "cache dir", links), (tmp_path / "cache", tmp_path / "cache" / "ragmlx")):
        execv = FakeExec()
        env = {"XDG_CACHE_HOME": str(cache), "LD_PRELOAD": "/x/libjemalloc.so"}
        fastpath.ensure_fast_blas(["main.py"], env=env, execv=execv)
        preload = execv.calls[0][2]["LD_PRELOAD"]
        first, second, rest = preload.split(":")
        assert " " not in preload and rest == "/x/libjemalloc.so"
        assert Path(first).parent == folder and os.readlink(first) == str(forwarder)
        assert Path(second).parent == folder and os.readlink(second) == str(blas) and "libopenblas" in second
        assert execv.calls[0][2]["RAGMLX_PRELOADED"] == f"{first}:{second}"
        assert (folder.stat().st_mode & 0o777) == 0o700


def test_no_reexec_when_no_private_folder_can_hold_a_link(slow_linux, monkeypatch, tmp_path):
    monkeypatch.setattr(fastpath.tempfile, "tempdir", str(tmp_path / "tmp dir"))
    monkeypatch.setattr(fastpath, "find_fast_blas", lambda env=None: "/opt/my libs/libopenblas.so.0")
    execv = FakeExec()
    message = fastpath.ensure_fast_blas(["main.py"], env={"XDG_CACHE_HOME": str(tmp_path / "c d")}, execv=execv)
    assert execv.calls == []
    assert message.startswith("BLAS: reference netlib BLAS (slow; cannot preload /opt/my libs/libopenblas.so.0: ")
    assert "spaces and colons" in message


@needs_pip_openblas
def test_real_reexec_with_a_blas_under_a_path_with_a_space(tmp_path):
    if fastpath._c_compiler() is None:
        pytest.skip("no C compiler here")
    venv = tmp_path / "my project" / "lib"  # e.g. a venv under "/home/me/my project/.venv"
    venv.mkdir(parents=True)
    (venv / "libscipy_openblas.so").symlink_to(PIP_OPENBLAS)
    (tmp_path / "tmp").mkdir()
    env = {**_clean_env(), "RAGMLX_BLAS": str(venv / "libscipy_openblas.so"), "PYTHONPATH": str(ROOT)}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache dir"), TMPDIR=str(tmp_path / "tmp"))
    out = subprocess.run([sys.executable, "-c", _PIP_CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr  # was 134: only the forwarder loaded, with no BLAS behind it
    message, checks, in_use = out.stdout.strip().splitlines()[-3:]
    assert float(checks.split()[0]) < 1e-3
    assert in_use.startswith("OpenBLAS (") and ", preloaded" in message and "matrix-vector products as GEMV" in in_use


def test_forwarder_cache_is_per_user_and_trusts_no_one_elses_files(monkeypatch, tmp_path, private_tmp):
    own = fastpath.build_gemv_forward(cache_dir=tmp_path / "own")
    if own is None or not sys.platform.startswith("linux"):
        pytest.skip("needs a C compiler on Linux")
    name = os.path.basename(own)
    private_tmp.chmod(0o1777)  # like /tmp
    planted = private_tmp / "ragmlx" / name  # what the old shared fallback folder held, from another user
    planted.parent.mkdir()
    planted.write_bytes(b"planted")
    env = {"XDG_CACHE_HOME": str(tmp_path / "notadir")}  # ~/.cache unusable: the temporary folder's turn
    (tmp_path / "notadir").write_text("")
    mine = private_tmp / f"ragmlx-{os.getuid()}"
    assert fastpath.build_gemv_forward(env) == str(mine / name)
    assert (mine.stat().st_mode & 0o777) == 0o700 and (mine / name).read_bytes() == Path(own).read_bytes()
    (mine / name).write_bytes(b"planted")
    (mine / name).chmod(0o666)  # a library others could have written: rebuilt, not reused
    assert fastpath.build_gemv_forward(env) == str(mine / name) and (mine / name).read_bytes() != b"planted"
    assert ((mine / name).stat().st_mode & 0o777) == 0o755
    mine.chmod(0o777)  # a folder others can write to: not used at all
    assert fastpath.build_gemv_forward(env) is None
    assert "no cache folder only this user can write to" in fastpath._forwarder_trouble(env)
    if os.getuid() == 0:  # a folder another user made for us
        mine.chmod(0o700)
        os.chown(mine, 12345, -1)
        assert fastpath.build_gemv_forward(env) is None


def test_without_a_private_folder_the_forwarder_is_left_out_and_the_line_says_why(slow_linux, monkeypatch, tmp_path):
    monkeypatch.setattr(fastpath.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(fastpath, "_c_compiler", lambda: "/usr/bin/cc")
    (tmp_path / f"ragmlx-{os.getuid()}").mkdir(mode=0o777)
    (tmp_path / f"ragmlx-{os.getuid()}").chmod(0o777)
    execv = FakeExec()
    env = {"XDG_CACHE_HOME": str(tmp_path / "notadir")}
    (tmp_path / "notadir").write_text("")
    fastpath.ensure_fast_blas(["main.py"], env=env, execv=execv)
    new_env = execv.calls[0][2]
    assert new_env["LD_PRELOAD"] == FAKE_LIB  # the BLAS still, without the forwarder
    note = new_env["RAGMLX_PRELOAD_NOTE"]
    assert note.startswith("matrix-vector products not as GEMV: no cache folder only this user can write to")
    monkeypatch.setattr(fastpath, "uses_reference_blas", lambda: False)
    monkeypatch.setattr(fastpath, "mlx_blas_library", lambda: FAKE_LIB)
    monkeypatch.setattr(fastpath, "openblas_core", lambda path: None)
    line = fastpath.ensure_fast_blas(["main.py"], env=new_env, execv=execv)
    assert line == f"BLAS: OpenBLAS ({FAKE_LIB}, preloaded); {note}"


def test_script_from_standard_input_is_not_reexecuted(slow_linux):
    execv = FakeExec()
    message = fastpath.ensure_fast_blas(["-", "--target", "none"], env={}, execv=execv)
    assert execv.calls == [], "`python -` would start again on a used-up standard input and do nothing"
    assert message.startswith("BLAS: reference netlib BLAS (slow; not re-started") and "standard input" in message


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS line's opt-outs are Linux's")
def test_no_fast_blas_flag_still_names_the_blas_first():
    env = _clean_env()
    for flag, extra in (("--no_fast_blas", {}), ("", {"RAGMLX_FAST_BLAS": "0"})):
        command = [sys.executable, "main.py", "--target", "none"] + ([flag] if flag else [])
        out = subprocess.run(command, cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        first = out.stdout.splitlines()[0]
        assert first.startswith("BLAS: ") and f"(fast path disabled by {flag or 'RAGMLX_FAST_BLAS=0'})" in first
