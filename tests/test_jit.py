"""Tests for jit: whether mx.compile has its compiler, and the precompiled header its CPU kernels include."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import fastpath
import jit
from helpers import mlx_lib_dir

ROOT = Path(__file__).resolve().parent.parent


def test_compiler_check(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(jit.shutil, "which", lambda name: None)
    assert jit.compiler_available() is False
    assert "g++" in jit.compiler_message()
    monkeypatch.setattr(jit.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert jit.compiler_available() is True
    assert jit.compiler_message() is None


needs_gxx = pytest.mark.skipif(
    not sys.platform.startswith("linux") or jit.compiler_available() is False, reason="needs g++ on Linux"
)

# Run in a child with TMPDIR set: precompile MLX's kernel header, then compile a function (MLX builds its kernel in
# the same folder) and print the PCH path and the max error against the uncompiled function.
_PCH_CHILD = """
import sys, jit, mlx.core as mx
pch = jit.precompile_kernel_header()
fn = lambda x: mx.tanh(x) * 3.0 + mx.exp(-x)
x = mx.arange(40, dtype=mx.float32) / 7.0
print(pch)
print(mx.abs(mx.compile(fn)(x) - fn(x)).max().item())
"""


@needs_gxx
def test_precompiled_kernel_header_is_what_mlx_kernel_builds_use(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("RAGMLX_KERNEL_PCH", None)
    out = subprocess.run([sys.executable, "-c", _PCH_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    pch, err = out.stdout.split()
    assert float(err) < 1e-6
    kernel_dir = jit.mlx_kernel_dir({"TMPDIR": str(tmp_path)})
    assert Path(pch) == kernel_dir / f"{jit.KERNEL_HEADER}.gch" and Path(pch).stat().st_size > 1 << 20
    sources = sorted(kernel_dir.glob("*.cpp"))  # the kernel MLX wrote and built there: our folder is its folder
    assert sources and (kernel_dir / f"lib{sources[0].stem}.so").is_file()
    # MLX's own build command on its kernel, with -H: GCC marks a PCH it used with "!", one it rejected with "x"
    import mlx.core as mx

    include = Path(mx.__file__).parent / "include"
    cmd = ["g++", "-std=c++17", "-O3", "-Wall", "-fPIC", "-shared", "-I", str(include), "-H", "-Winvalid-pch"]
    built = subprocess.run(cmd + [str(sources[0]), "-o", str(tmp_path / "k.so")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert f"! {pch}" in built.stderr.splitlines()


@needs_gxx
def test_precompiled_kernel_header_is_rebuilt_when_stale_and_can_be_turned_off(tmp_path):
    env = {"TMPDIR": str(tmp_path), "PATH": os.environ["PATH"]}
    assert jit.precompile_kernel_header({**env, "RAGMLX_KERNEL_PCH": "0"}) is None
    assert not (tmp_path / "mlx").exists()
    pch = Path(jit.precompile_kernel_header(env))
    stamp = pch.with_name(pch.name + ".json")
    first = pch.stat().st_mtime_ns
    assert jit.precompile_kernel_header(env) == str(pch) and pch.stat().st_mtime_ns == first  # reused
    recorded = json.loads(stamp.read_text())
    assert any(h[0].endswith(jit.KERNEL_HEADER) for h in recorded["headers"])
    recorded["headers"][0][1] += 1  # as if a header had changed size since
    stamp.write_text(json.dumps(recorded))
    assert jit.precompile_kernel_header(env) == str(pch) and pch.stat().st_mtime_ns != first
    second = pch.stat().st_mtime_ns
    stamp.write_text("{not json")  # a torn or foreign stamp: rebuilt, never trusted
    assert jit.precompile_kernel_header(env) == str(pch) and pch.stat().st_mtime_ns != second
    assert json.loads(stamp.read_text())["headers"][0][1] == recorded["headers"][0][1] - 1
    assert sorted(p.name for p in pch.parent.iterdir()) == [pch.name, stamp.name]  # no partial files left


@pytest.mark.parametrize("have_gxx", [True, False])
def test_runtime_setup_compiles_where_g_plus_plus_is_and_says_so_where_not(monkeypatch, capsys, have_gxx):
    import argparse

    import cores
    import pipeline

    built = []
    monkeypatch.setattr(jit, "compiler_available", lambda: have_gxx)
    monkeypatch.setattr(jit, "precompile_kernel_header", lambda: built.append(1))
    monkeypatch.setattr(fastpath, "keep_freed_memory", lambda: None)
    monkeypatch.setattr(cores, "configure", lambda n: 1)
    for choice in ("auto", "yes", "no"):
        args = argparse.Namespace(gpu=False, cpu_streams=1, compile=choice, seed=0)
        pipeline.setup_runtime(args)
        said = capsys.readouterr().out
        assert args.use_compile == (choice == "yes" or (choice == "auto" and have_gxx))
        assert ("g++ not found" in said) == (not have_gxx and choice != "no")
    assert len(built) == (2 if have_gxx else 0)  # the kernels' header, unless --compile no


def test_make_dependencies_reads_escaped_spaces_and_continued_lines():
    rule = "/tmp/my\\ kernels/h.gch: \\\n /opt/my\\ site/mlx/include/a.h /usr/include/b.h \\\n /x/c\\#d.h /x/$$e.h\n"
    assert jit.make_dependencies(rule) == [
        "/opt/my site/mlx/include/a.h",
        "/usr/include/b.h",
        "/x/c#d.h",
        "/x/$e.h",
    ]
    with pytest.raises(ValueError):
        jit.make_dependencies("no rule here")


_PCH_TWICE = """
import os, jit, mlx.core as mx
first = jit.precompile_kernel_header()
stamp = os.stat(first).st_mtime_ns if first else None
second = jit.precompile_kernel_header()
print(mx.__file__, first == second and stamp == os.stat(second).st_mtime_ns, sep="\\n")
"""


@needs_gxx
def test_precompiled_kernel_header_is_reused_when_mlx_lives_under_a_path_with_a_space(tmp_path):
    site = tmp_path / "my site"  # MLX installed in e.g. "/home/me/my project/.venv"
    site.mkdir()
    for package in ("mlx", "mlx_cpu.libs"):
        installed = mlx_lib_dir().parent.parent / package
        if installed.exists():
            (site / package).symlink_to(installed)
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    env.pop("RAGMLX_KERNEL_PCH", None)
    out = subprocess.run([sys.executable, "-c", _PCH_TWICE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    where, reused = out.stdout.strip().splitlines()[-2:]
    assert where.startswith(str(site)) and reused == "True"  # built once, not deleted and rebuilt by the next call
