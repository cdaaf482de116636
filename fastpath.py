"""Start-up fast paths for MLX on CPU: a real BLAS instead of the bundled reference one (the JIT compiler's side,
g++ and its precompiled header, is jit.py).

The Linux `mlx-cpu` wheel links `libmlx.so` against the netlib *reference* BLAS it ships in
`mlx_cpu.libs/`, so matmuls run ~30x slower than with OpenBLAS or MKL. Symbols in `LD_PRELOAD`
libraries come first in every lookup scope, so re-executing the interpreter with a fast BLAS preloaded
makes MLX call it instead. This has to happen before the process starts, hence the re-exec.

OpenBLAS picks its kernels from the CPU unless OPENBLAS_CORETYPE names a set; the start-up line names the set in
use and says when that variable holds it to AVX2 kernels on an AVX-512 CPU (1.85x slower matmuls on this
project's reference machine), but never overrides it: it is the user's (or their machine image's) choice.

With the BLAS, the re-exec preloads `gemv_forward.c` (compiled once with the C compiler, cached in a folder only
this user can write to): a `cblas_sgemm` that sends matrix-vector shaped products to `cblas_sgemv` instead (see that
file; decoding one token at a time is made of them), and the rest on to the BLAS. `RAGMLX_GEMV_FORWARD=0` leaves it
out. ld.so splits LD_PRELOAD at spaces and colons, so a library whose path has one goes in through a link there.

Without a system OpenBLAS (or MKL), the BLAS is the `scipy-openblas32` wheel from requirements.txt, so `pip install`
alone gives the fast path, no root needed. It exports only prefixed names (`scipy_cblas_sgemm`), not the
`cblas_sgemm` MLX imports, so it needs the forwarder, which then calls the prefixed functions (RAGMLX_BLAS_PREFIX
tells it the prefix). Training steps and large GEMMs ran as fast as with Debian's OpenBLAS 0.3.21 on machine A,
cached decoding ~10% slower, so a system OpenBLAS still comes first. (numpy's own bundled copy, `scipy_openblas64_`,
uses 64-bit integers and cannot stand in for the LP64 CBLAS MLX calls.) On macOS MLX already uses Accelerate.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import stat
import struct
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

# The BLAS entry points libmlx.so imports (`nm -D --undefined-only libmlx.so`); LAPACK comes along too.
REQUIRED_SYMBOLS = ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm")

# Debian/Ubuntu (multiarch), Fedora/RHEL, Arch and /usr/local builds; pthread builds before OpenMP ones.
_OPENBLAS_PATHS = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)

_SLOW_HINT = "pip install scipy-openblas32 and a C compiler, or apt-get install libopenblas0-pthread"
# Symbol prefixes of BLAS builds that rename their functions (the scipy-openblas32 wheel).
_BLAS_PREFIXES = ("scipy_",)

# Functions only optimised BLAS builds define (under the prefixes above too): a library with none of them, and a name
# classify_blas does not know, is taken for a reference BLAS.
_BLAS_MARKERS = (
    ("openblas_get_corename", "OpenBLAS"),
    ("MKL_Get_Max_Threads", "MKL"),
    ("bli_info_get_version_str", "BLIS"),
)

# The AVX-512 parts OpenBLAS's SkylakeX/Cooperlake kernels use, and its kernel sets for AVX2-only CPUs.
_AVX512 = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
_AVX2_CORES = frozenset({"haswell", "zen"})


def _is_linux() -> bool:
    return sys.platform.startswith("linux") and platform.system() == "Linux"


def _is_macos() -> bool:
    return sys.platform == "darwin" or platform.system() == "Darwin"


def exported_symbols(path: str) -> set[str]:
    """Names of the functions and objects an ELF shared library defines in its dynamic symbol table.

    Pure Python (reads `.dynsym`/`.dynstr`), so it needs no binutils and loads nothing into this process.
    Returns an empty set for files that are not 64-bit little-endian ELF.
    """
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return set()
        (shoff,) = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize) for i in range(shnum)]
        names: set[str] = set()
        for _name, sh_type, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
            if sh_type != 11 or link >= len(sections) or not entsize:  # 11 = SHT_DYNSYM
                continue
            f.seek(sections[link][4])
            strtab = f.read(sections[link][5])
            f.seek(offset)
            symtab = f.read(size)
            for i in range(0, size - entsize + 1, entsize):
                st_name, st_info, _other, st_shndx = struct.unpack_from("<IBBH", symtab, i)
                # shndx 0 = undefined (imported); info & 0xF in {1 object, 2 func, 10 ifunc}
                if st_shndx != 0 and (st_info & 0xF) in (1, 2, 10):
                    end = strtab.find(b"\0", st_name)
                    names.add(strtab[st_name:end].decode("ascii", "replace"))
        return names


def is_usable_blas(path: str) -> bool:
    """True when `path` is a shared library that defines every CBLAS entry point MLX imports."""
    return blas_prefix(path) == ""


def blas_prefix(path: str) -> str | None:
    """The prefix of the BLAS's CBLAS names: empty for one that defines every entry point MLX imports under its
    own name; "scipy_" (say) for one that defines `<prefix>cblas_sgemm` and `<prefix>cblas_sgemv`, which MLX
    reaches only through gemv_forward.c; None for anything else (or an unreadable or truncated file)."""
    try:
        names = exported_symbols(path)
    except (OSError, struct.error):
        return None
    if set(REQUIRED_SYMBOLS) <= names:
        return ""
    for prefix in _BLAS_PREFIXES:
        if {f"{prefix}cblas_sgemm", f"{prefix}cblas_sgemv"} <= names:
            return prefix
    return None


def _pip_openblas_candidates() -> list[str]:
    # The scipy-openblas32 wheel (requirements.txt): OpenBLAS with every name prefixed by "scipy_", in
    # <site-packages>/scipy_openblas32/lib/. Found without importing it.
    try:
        spec = importlib.util.find_spec("scipy_openblas32")
    except (ImportError, ValueError):
        return []
    folders = list(spec.submodule_search_locations or []) if spec else []
    return [p for folder in folders for p in sorted(glob.glob(os.path.join(folder, "lib", "libscipy_openblas*.so*")))]


def _mkl_candidates() -> list[str]:
    # `pip install mkl` puts libmkl_rt.so.N in <prefix>/lib, not in site-packages.
    roots = {os.path.join(sys.prefix, "lib"), os.path.join(sys.base_prefix, "lib")}
    roots.update(p for p in (sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")) if p)
    found: list[str] = []
    for root in sorted(roots):
        found += sorted(glob.glob(os.path.join(root, "libmkl_rt.so*")), reverse=True)
    return found


def _ldconfig_openblas() -> list[str]:
    ldconfig = shutil.which("ldconfig") or ("/sbin/ldconfig" if os.path.exists("/sbin/ldconfig") else None)
    if ldconfig is None:
        return []
    try:
        out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    # Lines look like: "\tlibopenblas.so.0 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libopenblas.so.0"
    return [line.rsplit("=> ", 1)[1].strip() for line in out.splitlines() if "libopenblas" in line and "=> " in line]


def find_fast_blas(env: Mapping[str, str] | None = None, with_prefixed: bool = True) -> str | None:
    """Path of a fast BLAS that can be preloaded under MLX, or None.

    Order: `RAGMLX_BLAS` (an explicit path), system OpenBLAS (common paths, then `ldconfig -p`), MKL installed
    from PyPI, then the scipy-openblas32 wheel that requirements.txt installs (its names are prefixed, so it also
    needs gemv_forward.c built: `with_prefixed=False` leaves it out). OpenBLAS comes first because it measured
    faster than MKL for MLX on AMD EPYC (see bench/blas_results.json), the system's before the wheel's because
    its decoding steps measured ~10% faster on machine A (bench/README.md). Raises ValueError when RAGMLX_BLAS
    names an unusable file, one that does not load here included (a dependency missing): the re-executed process
    would die in ld.so before it could say why.
    """
    env = os.environ if env is None else env
    explicit = env.get("RAGMLX_BLAS", "")
    if explicit:
        if not os.path.isfile(explicit):
            raise ValueError(f"RAGMLX_BLAS={explicit}: no such file")
        if blas_prefix(explicit) is None:
            raise ValueError(
                f"RAGMLX_BLAS={explicit}: does not export {', '.join(REQUIRED_SYMBOLS)} (or scipy_cblas_sgemm)"
            )
        path = os.path.abspath(explicit)  # ld.so looks for a preloaded name without a slash in its own folders
        try:
            ctypes.CDLL(path)  # RTLD_LOCAL: MLX's lookups do not see it here
        except OSError as err:
            raise ValueError(f"RAGMLX_BLAS={explicit}: cannot be loaded ({err})") from None
        return path
    arch = platform.machine() or "x86_64"
    candidates = [p.format(arch=arch) for p in _OPENBLAS_PATHS] + _ldconfig_openblas() + _mkl_candidates()
    for path in candidates:
        if os.path.isfile(path) and is_usable_blas(path):
            return path
    if with_prefixed:
        for path in _pip_openblas_candidates():
            if blas_prefix(path):
                return path
    return None


def classify_blas(path: str | None) -> str:
    """Human name of the BLAS library at `path` ("OpenBLAS", "MKL", "BLIS", "Arm PL" or "reference netlib BLAS").

    By file and folder name first (Debian's alternatives put OpenBLAS's libblas.so.3 in openblas-pthread/); MLX's
    bundled mlx_cpu.libs/libblas-*.so is the reference one. Any other name (a renamed copy, README's
    `RAGMLX_BLAS=/path/libblas.so`) is judged by the functions only an optimised build defines, so that a fast BLAS
    the user chose is neither reported as failed nor overridden; with none of them it is taken for a reference BLAS.
    """
    if path is None:
        return "unknown BLAS"
    real = os.path.realpath(path)
    folder, name = os.path.basename(os.path.dirname(real)), os.path.basename(real)
    if folder == "mlx_cpu.libs" and name.startswith("libblas"):
        return "reference netlib BLAS"
    where = f"{name}/{folder}".lower()
    for key, family in (("mkl", "MKL"), ("openblas", "OpenBLAS"), ("blis", "BLIS"), ("armpl", "Arm PL")):
        if key in where:
            return family
    return _blas_family_by_symbols(real) or "reference netlib BLAS"


def _blas_family_by_symbols(path: str) -> str | None:
    """The optimised BLAS family whose marker function (_BLAS_MARKERS) the library at `path` defines, else None."""
    try:
        names = exported_symbols(path)
    except (OSError, struct.error):
        return None
    for marker, family in _BLAS_MARKERS:
        if any(f"{prefix}{marker}" in names for prefix in ("", *_BLAS_PREFIXES)):
            return family
    return None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags Linux reports for this CPU (empty when it cannot say)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def openblas_core(path: str) -> str | None:
    """The kernel set ("Haswell", "Cooperlake", ...) the OpenBLAS at `path` runs in this process; None for another
    BLAS (no `openblas_get_corename`) or no library. Loads it (RTLD_LOCAL) when it is not loaded yet."""
    try:
        library = ctypes.CDLL(path)
    except OSError:
        return None
    for prefix in ("", *_BLAS_PREFIXES):
        try:
            corename = library[f"{prefix}openblas_get_corename"]
        except AttributeError:
            continue
        corename.restype = ctypes.c_char_p
        return (corename() or b"").decode() or None
    return None


def forced_kernels_hint(core: str | None, env: Mapping[str, str], flags: frozenset[str]) -> str | None:
    """A note when OPENBLAS_CORETYPE holds OpenBLAS to AVX2 kernels on a CPU with AVX-512, else None.

    OpenBLAS picks its kernels from the CPU unless OPENBLAS_CORETYPE names a set; machine images set it to get
    the same rounding on every host of a fleet. It is the user's choice, so we only say what it costs: on this
    project's reference machine (AMD EPYC, Zen 5) the AVX-512 kernels ran a 2048^3 matmul at 1.85x the speed of
    Haswell's (bench/blas.py)."""
    forced = env.get("OPENBLAS_CORETYPE", "")
    if not forced or core is None or core.lower() not in _AVX2_CORES or not _AVX512 <= flags:
        return None
    return f"OPENBLAS_CORETYPE={forced} keeps it off this CPU's AVX-512 kernels; unset it for faster matmuls"


GEMV_FORWARD_SOURCE = Path(__file__).with_name("gemv_forward.c")
_GEMV_FORWARD_MARK = "ragmlx_gemv_forward_to"  # a function only that library defines


def _cache_dirs(env: Mapping[str, str]) -> tuple[Path, Path]:
    """Where this user's compiled forwarder and preload links go, in order: $XDG_CACHE_HOME/ragmlx (~/.cache/ragmlx),
    then <temporary folder>/ragmlx-<uid>. One folder per user: a library another user put there would be preloaded
    into this process."""
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ragmlx", Path(tempfile.gettempdir()) / f"ragmlx-{os.getuid()}"


def _is_private(path: Path, kind: Callable[[int], bool]) -> bool:
    """Whether `path` itself (not a link to it) is a `kind` (stat.S_ISDIR, S_ISREG) owned by this user that no
    other can write to: what LD_PRELOAD names runs with this user's rights."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return kind(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _private_folder(folder: Path) -> bool:
    """Whether `folder` is private (see _is_private), created with mode 0700 when missing."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return False
    return _is_private(folder, stat.S_ISDIR)


def _c_compiler() -> str | None:
    """The C compiler that builds gemv_forward.c (cc, gcc or g++ on PATH), or None."""
    return next((c for c in (shutil.which("cc"), shutil.which("gcc"), shutil.which("g++")) if c), None)


def build_gemv_forward(env: Mapping[str, str] = os.environ, cache_dir: Path | None = None) -> str | None:
    """Path of `gemv_forward.c` compiled into a shared library, built once per source in the first private folder
    of _cache_dirs (or `cache_dir`); None without a C compiler (cc, gcc or g++) or a private folder, or when the
    build fails. A library found there is reused only when this user owns it and no other can write to it; reusing
    one needs no compiler."""
    if not GEMV_FORWARD_SOURCE.is_file():
        return None
    source = GEMV_FORWARD_SOURCE.read_bytes()
    name = f"libragmlx_gemv_forward-{hashlib.sha1(source + platform.machine().encode()).hexdigest()[:12]}.so"
    folders = [f for f in ((cache_dir,) if cache_dir else _cache_dirs(env)) if _private_folder(f)]
    built = next((str(f / name) for f in folders if _is_private(f / name, stat.S_ISREG)), None)
    compiler = _c_compiler()
    if built is not None or compiler is None:
        return built
    for folder in folders:
        target = folder / name
        try:
            partial = folder / f"{name}.{os.getpid()}.tmp"
            command = [compiler, "-x", "c", "-O2", "-shared", "-fPIC", "-o", str(partial), str(GEMV_FORWARD_SOURCE)]
            done = subprocess.run(command + ["-ldl"], capture_output=True, timeout=120)
            if done.returncode == 0:
                os.chmod(partial, 0o755)  # under umask 002 it would be group-writable, so not reused
                os.replace(partial, target)  # atomic: a concurrent start sees the whole library or none
                return str(target)
            partial.unlink(missing_ok=True)
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def _forwarder_trouble(env: Mapping[str, str]) -> str:
    """Why build_gemv_forward(env) gave no library, in words."""
    if _c_compiler() is None:
        return "no C compiler (cc, gcc or g++)"
    if not any(_private_folder(folder) for folder in _cache_dirs(env)):
        first, second = _cache_dirs(env)
        return f"no cache folder only this user can write to ({first} and {second} are not)"
    return "its build failed"


# ld.so splits LD_PRELOAD at these, and has no way to escape them.
_PRELOAD_SEPARATORS = frozenset(" :")


def _preloadable(path: str, env: Mapping[str, str]) -> str | None:
    """`path` as LD_PRELOAD can name it: itself, or, when it holds a space or colon ("/home/me/my project/.venv/..."),
    a link to it in the first private folder of _cache_dirs whose own path has neither; None when there is none."""
    if not _PRELOAD_SEPARATORS & set(path):
        return path
    target = os.path.abspath(path)
    digest = hashlib.sha1(os.fsencode(target)).hexdigest()[:12]
    name = f"preload-{digest}-{re.sub('[ :]', '_', os.path.basename(target))}"  # the library's name, for the reader
    for folder in _cache_dirs(env):
        if _PRELOAD_SEPARATORS & set(str(folder)) or not _private_folder(folder):
            continue
        partial = folder / f"{name}.{os.getpid()}.tmp"
        try:
            partial.unlink(missing_ok=True)
            os.symlink(target, partial)
            os.replace(partial, folder / name)  # atomic, like the forwarder's build
            return str(folder / name)
        except OSError:
            continue
    return None


def needs_forwarder(prefix: str, env: Mapping[str, str]) -> bool:
    """Whether gemv_forward.c goes in front of a BLAS whose names carry `prefix`: to route matrix-vector products
    to sgemv (unless RAGMLX_GEMV_FORWARD=0), and always for a prefixed BLAS, which MLX reaches only through it."""
    return bool(prefix) or _routes_gemv(env)


def _routes_gemv(env: Mapping[str, str]) -> bool:
    return env.get("RAGMLX_GEMV_FORWARD", "") != "0"


def load_blas_in_process(blas: str, forward: str | None = None, env: Mapping[str, str] = os.environ) -> None:
    """Make MLX, not imported yet, use the BLAS at `blas` (and the forwarder at `forward` first, when
    `needs_forwarder`) in this process: load them RTLD_GLOBAL, as LD_PRELOAD would (the tests do this instead of
    re-executing pytest). With RAGMLX_GEMV_FORWARD=0 a prefixed BLAS's forwarder sends every product to sgemm."""
    prefix = blas_prefix(blas) or ""
    if prefix and not forward:
        raise ValueError(f"{blas}: its names start with {prefix!r}, so MLX can only reach it through gemv_forward.c")
    if forward and needs_forwarder(prefix, env):
        forwarder = ctypes.CDLL(forward, mode=ctypes.RTLD_GLOBAL)
        library = ctypes.CDLL(blas, mode=ctypes.RTLD_GLOBAL)
        to = forwarder[_GEMV_FORWARD_MARK]
        to.argtypes, to.restype = [ctypes.c_void_p, ctypes.c_void_p], None
        sgemv = ctypes.cast(library[f"{prefix}cblas_sgemv"], ctypes.c_void_p) if _routes_gemv(env) else None
        to(ctypes.cast(library[f"{prefix}cblas_sgemm"], ctypes.c_void_p), sgemv)
    else:
        ctypes.CDLL(blas, mode=ctypes.RTLD_GLOBAL)


def _forwarder_of_mlx() -> ctypes.CDLL | None:
    """gemv_forward.c's library when MLX's `cblas_sgemm` resolves to it in this process, else None."""
    path = _library_of(ctypes.CDLL(None), REQUIRED_SYMBOLS[0]) if _is_linux() else None
    if path is None:
        return None
    try:
        library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        library[_GEMV_FORWARD_MARK]  # a function only that library defines
        return library
    except (OSError, AttributeError):
        return None


def gemv_forwarding_active() -> bool:
    """Whether MLX's matrix-vector products go to sgemv through gemv_forward.c in this process (Linux)."""
    forwarder = _forwarder_of_mlx()
    if forwarder is None:
        return False
    try:
        return bool(forwarder.ragmlx_gemv_forward_routes())
    except AttributeError:  # a library built from an older gemv_forward.c
        return True


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _library_of(handle: ctypes.CDLL, symbol: str) -> str | None:
    """File of the library that `dlsym(handle, symbol)` resolves to, or None when it is not found."""
    try:
        return _library_at(ctypes.cast(getattr(handle, symbol), ctypes.c_void_p).value)
    except AttributeError:
        return None


def _library_at(address: int | None) -> str | None:
    """File of the loaded library that holds `address`, or None."""
    if not address:
        return None
    for libname in (None, "libdl.so.2"):  # glibc >= 2.34 has dladdr in libc; older ones in libdl
        try:
            dladdr = ctypes.CDLL(libname).dladdr
        except (OSError, AttributeError):
            continue
        info = _DlInfo()
        if dladdr(ctypes.c_void_p(address), ctypes.byref(info)) and info.dli_fname:
            return os.path.normpath(os.fsdecode(info.dli_fname))
    return None


def _mapped_fast_blas_fallback() -> str | None:
    # Without dladdr: a fast BLAS that is both in LD_PRELOAD and mapped wins every lookup.
    try:
        with open("/proc/self/maps") as f:
            mapped = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    except OSError:
        return None
    mapped_real = {os.path.realpath(p) for p in mapped}
    for entry in os.environ.get("LD_PRELOAD", "").replace(" ", ":").split(":"):
        if entry and os.path.realpath(entry) in mapped_real and classify_blas(entry) != "reference netlib BLAS":
            return entry
    return None


def mlx_blas_library() -> str | None:
    """Path of the library whose `cblas_sgemm` MLX calls in this process (Linux only; imports mlx.core).

    Python loads extensions RTLD_LOCAL, so libmlx.so resolves a symbol first in the global scope (the program,
    LD_PRELOAD libraries, RTLD_GLOBAL libraries) and only then in its own dependencies. We do the same
    lookups with dlsym, which, unlike grepping /proc/self/maps for "openblas", is not fooled by numpy's
    prefixed scipy_openblas or by a BLAS that is mapped but loses the lookup.
    """
    import mlx.core as mx

    found = _library_of(ctypes.CDLL(None), REQUIRED_SYMBOLS[0])
    forwarder = _forwarder_of_mlx()
    if forwarder is not None:  # the library it calls, found by address (the BLAS's names may be prefixed)
        try:
            target = forwarder.ragmlx_gemv_forward_target
            target.restype = ctypes.c_void_p
            found = _library_at(target())
        except AttributeError:  # built from an older gemv_forward.c: its BLAS also defines cblas_dgemm
            found = _library_of(ctypes.CDLL(None), REQUIRED_SYMBOLS[1])
    if found is not None:
        return found
    try:
        core = ctypes.CDLL(mx.__file__, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return _mapped_fast_blas_fallback()
    return _library_of(core, REQUIRED_SYMBOLS[0]) or _mapped_fast_blas_fallback()


def uses_reference_blas() -> bool:
    """True on Linux when MLX's matmuls go to a reference (non-optimised) BLAS in this process."""
    if not _is_linux():
        return False
    return classify_blas(mlx_blas_library()) == "reference netlib BLAS"


def blas_in_use() -> str:
    """One-phrase description of the BLAS MLX uses in this process, e.g. "OpenBLAS (/usr/lib/...so.0)"."""
    if _is_macos():
        return "Accelerate (macOS)"
    if not _is_linux():
        return f"platform default ({platform.system() or sys.platform})"
    return _describe(mlx_blas_library())


def _describe(path: str | None, note: str = "") -> str:
    """The library at `path` in words, e.g. "OpenBLAS (/path/lib.so<note>, Haswell kernels)"."""
    core = openblas_core(path) if path else None
    note += f", {core} kernels" if core else ""
    note += ", matrix-vector products as GEMV" if gemv_forwarding_active() else ""
    return f"{classify_blas(path)} ({path}{note})"


def _command_line(argv: list[str]) -> list[str]:
    # sys.argv loses `-c CODE`, `-m MOD` and interpreter flags; sys.orig_argv (3.10+) keeps them.
    if argv == sys.argv and getattr(sys, "orig_argv", None):
        return [sys.executable, *sys.orig_argv[1:]]
    return [sys.executable, *argv]


def ensure_fast_blas(
    argv: list[str],
    env: Mapping[str, str] = os.environ,
    execv: Callable[[str, list[str], dict[str, str]], object] = os.execve,
) -> str:
    """Re-exec this interpreter with a fast BLAS in LD_PRELOAD when MLX would use the reference one.

    Call at start-up, before heavy work, with `sys.argv`. Re-execs only on Linux, when the reference BLAS is in
    use, a fast one is found, `RAGMLX_FAST_BLAS` is not "0", `RAGMLX_REEXEC` is not "1" (the loop guard) and the
    script is not read from standard input (`python -`: the new process would find it used up and do nothing);
    `gemv_forward.c`'s library goes first in LD_PRELOAD when it builds, unless `RAGMLX_GEMV_FORWARD` is "0".
    The real `os.execve` never returns; otherwise the result is a one-line description to print.
    """
    if not _is_linux():
        return "BLAS: Accelerate (macOS)" if _is_macos() else f"BLAS: {blas_in_use()}"
    if env.get("RAGMLX_FAST_BLAS", "") == "0":
        return fast_blas_disabled("RAGMLX_FAST_BLAS=0")
    if not uses_reference_blas():
        return _fast_blas_line(env)
    if env.get("RAGMLX_REEXEC") == "1":
        preload = env.get("LD_PRELOAD", "")
        return f"BLAS: reference netlib BLAS (slow; preloading {preload!r} did not take effect)"
    lib = find_fast_blas(env)
    if lib is None:
        return f"BLAS: reference netlib BLAS (slow; {_SLOW_HINT})"
    if argv[:1] in (["-"], [""]):
        return f"BLAS: reference netlib BLAS (slow; not re-started with {lib}: the script came from standard input)"
    new_env = _preload_env(lib, env)
    if isinstance(new_env, str):
        return f"BLAS: reference netlib BLAS (slow; {new_env})"
    command = _command_line(argv)
    sys.stdout.flush()  # exec discards buffered output
    sys.stderr.flush()
    try:
        execv(command[0], command, new_env)
    except OSError as err:
        return f"BLAS: reference netlib BLAS (slow; re-exec with {lib} failed: {err})"
    return f"BLAS: re-executing with LD_PRELOAD={new_env['LD_PRELOAD']}"


def fast_blas_disabled(how: str) -> str:
    """The start-up line when the user turned the fast path off (`how`: the flag or variable), naming the BLAS."""
    if not _is_linux():
        return f"BLAS: {blas_in_use()}"
    return f"BLAS: {classify_blas(mlx_blas_library())} (fast path disabled by {how})"


def _fast_blas_line(env: Mapping[str, str]) -> str:
    """The start-up line when MLX already uses an optimised BLAS: which, what OPENBLAS_CORETYPE costs, and after our
    re-exec why the forwarder is not in front where it was wanted (RAGMLX_PRELOAD_NOTE)."""
    path = mlx_blas_library()
    reexeced = env.get("RAGMLX_REEXEC") == "1"
    hint = forced_kernels_hint(openblas_core(path) if path else None, env, cpu_flags())
    notes = [note for note in (hint, env.get("RAGMLX_PRELOAD_NOTE") if reexeced else None) if note]
    return f"BLAS: {_describe(path, ', preloaded' if reexeced else '')}" + "".join(f"; {note}" for note in notes)


def _preload_env(lib: str, env: Mapping[str, str]) -> dict[str, str] | str:
    """`env` for the re-exec, with `lib` (behind gemv_forward.c's library where needs_forwarder) in front of
    LD_PRELOAD; or, when they cannot be preloaded, why not."""
    prefix = blas_prefix(lib) or ""
    wanted = needs_forwarder(prefix, env)
    forward = build_gemv_forward(env) if wanted else None
    if prefix and not forward:  # MLX reaches a prefixed BLAS only through the forwarder
        return f"using {lib} needs gemv_forward.c: {_forwarder_trouble(env)}"
    files = [forward, lib] if forward else [lib]  # the forwarder first: its cblas_sgemm must win the lookup
    names = [_preloadable(file, env) for file in files]
    if None in names:
        unnamed = files[names.index(None)]
        why = "ld.so splits LD_PRELOAD at spaces and colons, and no private cache folder free of them can hold a link"
        return f"cannot preload {unnamed}: {why}"
    ours = ":".join(names)
    new_env = dict(env)
    for name in ("RAGMLX_BLAS_PREFIX", "RAGMLX_PRELOAD_NOTE"):  # never inherited from a parent process
        new_env.pop(name, None)
    if prefix:  # the names the forwarder calls
        new_env["RAGMLX_BLAS_PREFIX"] = prefix
    if wanted and not forward:
        new_env["RAGMLX_PRELOAD_NOTE"] = f"matrix-vector products not as GEMV: {_forwarder_trouble(env)}"
    existing = env.get("LD_PRELOAD", "")
    new_env["LD_PRELOAD"] = f"{ours}:{existing}" if existing else ours
    new_env["RAGMLX_REEXEC"] = "1"
    new_env["RAGMLX_PRELOADED"] = ours  # what we added, for subprocesses that want the user's environment back
    return new_env


def keep_freed_memory() -> None:
    """Let glibc keep freed buffers for reuse instead of returning them to the kernel (Linux; else nothing).

    A training step frees and re-allocates the same large buffers every time. By default glibc serves blocks of
    128 KiB-32 MiB with fresh mmaps and trims the free top of its heap beyond 128 KiB (more once its thresholds
    adapt, never more than 64 MiB), so every step faulted zeroed pages back in: ~40,000 page faults and about a
    third of a generator step in system time here. Blocks up to 32 MiB (glibc's largest mmap threshold) now come
    from the heap, and its free top is kept up to 2 GiB: a step's memory swings by more than any smaller
    threshold (dim 256 FiD generator, batch 32: 100,000 faults a step at 256 MiB, 3,000 at 2 GiB, 8% faster).
    Peak memory is unchanged: the heap only keeps what the step itself reached (measured: 2.21 GB either way)."""
    if not _is_linux():
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, (1 << 31) - 1)  # mallopt takes an int: 2 GiB is the most it can say
