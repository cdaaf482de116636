"""`mx.compile` on the CPU: whether its JIT compiler is there, and the header every kernel it builds includes,
precompiled.

MLX's CPU backend builds each fused kernel with `g++` the first time a machine needs it (and silently runs
uncompiled without it); `precompile_kernel_header` makes those builds ~4x faster by giving GCC the header they all
include precompiled, beside the kernels.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from fastpath import _is_linux, _is_macos


def compiler_available() -> bool:
    """Whether `mx.compile` can JIT on this machine: MLX's CPU backend shells out to `g++` on Linux."""
    if _is_macos():
        return True
    return shutil.which("g++") is not None


def compiler_message() -> str | None:
    """A one-line warning for main.py when `mx.compile` would silently run uncompiled, else None."""
    if compiler_available():
        return None
    return "mx.compile: g++ not found on PATH, so training steps run uncompiled on the CPU (apt-get install g++)"


# The header every kernel MLX 0.32's CPU JIT writes starts with; libmlx.so holds this line when it does.
KERNEL_HEADER = "mlx/backend/cpu/compiled_preamble.h"
_KERNEL_INCLUDE = f'#include "{KERNEL_HEADER}"'.encode()
# libmlx.so's build command, less `-shared` and the output (`strings libmlx.so | grep 'g++ -std'`); a precompiled
# header is only used by a compile with the same code-generation options.
_KERNEL_FLAGS = ("-std=c++17", "-O3", "-Wall", "-fPIC")


def mlx_kernel_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where MLX's CPU backend writes the kernels `mx.compile` builds: C++'s temp_directory_path() (TMPDIR, TMP,
    TEMP or TEMPDIR, else /tmp) / mlx / <version> / cpu. Imports mlx.core."""
    import mlx.core as mx

    base = next((env[k] for k in ("TMPDIR", "TMP", "TEMP", "TEMPDIR") if env.get(k)), "/tmp")
    return Path(base) / "mlx" / mx.__version__ / "cpu"


def _file_stamps(paths: list[str]) -> list[list]:
    """[path, size, mtime_ns] of each file: what a precompiled header depends on."""
    return [[p, (st := os.stat(p)).st_size, st.st_mtime_ns] for p in paths]


def _stamp_matches(stamp_path: Path, compiler: list) -> bool:
    try:
        stamp = json.loads(stamp_path.read_text())
        return stamp["compiler"] == compiler and stamp["headers"] == _file_stamps([h[0] for h in stamp["headers"]])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def make_dependencies(rule: str) -> list[str]:
    """The files a make-style dependency rule (what `g++ -MD` writes: "target: dep dep", lines continued with a
    backslash) lists after its target: continued lines joined, and the backslash GCC puts before a space or '#' in a
    path and its doubled '$' undone. A plain .split() cut a path with a space (MLX installed under "my project/") in
    two, so the precompiled header was rebuilt on every start. ValueError for text without a rule."""
    joined = rule.replace("\\\n", " ")
    _target, dependencies = re.split(r":\s", joined, maxsplit=1)  # GCC escapes the spaces a target holds
    words = re.split(r"(?<!\\)\s+", dependencies.strip())
    return [re.sub(r"\\([ #])", r"\1", word).replace("$$", "$") for word in words if word]


def precompile_kernel_header(env: Mapping[str, str] = os.environ, timeout: float = 300) -> str | None:
    """Build MLX's kernel header once as a GCC precompiled header in MLX's kernel folder; its path, or None.

    Each kernel `mx.compile` builds on the CPU is a `g++ -O3` run on a few lines that include KERNEL_HEADER, and
    parsing that header is most of the run: 0.8 s a kernel, ~100 kernels (80 s) on a fresh machine before the
    main command's steps run at speed. GCC looks for `<header>.gch` in the including file's folder before the -I
    folders, so a PCH at `<kernel folder>/mlx/backend/cpu/compiled_preamble.h.gch` is used by every later kernel
    build: 0.2 s a kernel, the same machine code (all 99 kernels then in the cache compared). A stamp beside
    it records the g++ and every header it was built from (size, mtime); any change rebuilds it. GCC ignores a
    PCH it cannot use (another g++, other options), so the worst case is the old speed. None (nothing built) off
    Linux, without g++, with `RAGMLX_KERNEL_PCH=0`, when this MLX does not include that header, or on failure.
    """
    gxx = shutil.which("g++", path=env.get("PATH"))
    if not _is_linux() or gxx is None or env.get("RAGMLX_KERNEL_PCH", "") == "0":
        return None
    import mlx.core as mx

    package = Path(mx.__file__).parent
    include = package / "include"
    header = include / KERNEL_HEADER
    target = mlx_kernel_dir(env) / f"{KERNEL_HEADER}.gch"
    stamp_path = target.with_name(target.name + ".json")
    partial, deps = (target.with_name(f"{target.name}.{os.getpid()}.{x}") for x in ("tmp", "d"))
    try:
        compiler = _file_stamps([os.path.realpath(gxx)])[0]
        if target.is_file() and _stamp_matches(stamp_path, compiler):
            return str(target)
        with open(package / "lib" / "libmlx.so", "rb") as f:
            if not header.is_file() or _KERNEL_INCLUDE not in f.read():
                return None
        target.parent.mkdir(parents=True, exist_ok=True)
        command = [gxx, *_KERNEL_FLAGS, "-I", str(include), "-x", "c++-header", str(header), "-o", str(partial)]
        if subprocess.run(command + ["-MD", "-MF", str(deps)], capture_output=True, timeout=timeout).returncode:
            return None
        headers = make_dependencies(deps.read_text())  # every file the header pulled in
        stamp = json.dumps({"compiler": compiler, "headers": _file_stamps(headers)})
        os.replace(partial, target)  # atomic: a kernel build sees the whole PCH or none
        deps.write_text(stamp)
        os.replace(deps, stamp_path)
        return str(target)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    finally:
        partial.unlink(missing_ok=True)
        deps.unlink(missing_ok=True)
