"""Benchmark MLX on CPU with the bundled reference BLAS, OpenBLAS and MKL preloaded.

`python bench/blas.py` runs each configuration in its own subprocess (LD_PRELOAD set, RAGMLX_FAST_BLAS=0 so
nothing re-execs), prints a table and writes bench/blas_results.json. `--worker` is the per-process half.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fastpath  # noqa: E402


def _mkl_path() -> str | None:
    for path in fastpath._mkl_candidates():
        if fastpath.is_usable_blas(path):
            return path
    return None


def _openblas_path() -> str | None:
    arch = platform.machine() or "x86_64"
    for pattern in fastpath._OPENBLAS_PATHS:
        path = pattern.format(arch=arch)
        if os.path.isfile(path) and fastpath.is_usable_blas(path):
            return path
    return None


def matmul_gflops(n: int, repeats: int) -> float:
    """Best-of-`repeats` GFLOP/s of an n x n x n float32 matmul."""
    import mlx.core as mx

    a = mx.random.normal((n, n), key=mx.random.key(0))
    b = mx.random.normal((n, n), key=mx.random.key(1))
    mx.eval(a, b)
    mx.eval(a @ b)  # warm-up: thread pools, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def train_step_ms(steps: int, dim: int = 256, seq: int = 128, batch: int = 8) -> tuple[float, float]:
    """Median milliseconds per compiled AdamW step of a 2-layer pre-norm transformer LM, and the last loss."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    vocab = 1024

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = nn.MultiHeadAttention(dim, 4)
            self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def __call__(self, x, mask):
            h = self.ln1(x)
            x = x + self.attn(h, h, h, mask)
            return x + self.down(nn.gelu(self.up(self.ln2(x))))

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.blocks = [Block(), Block()]
            self.out = nn.Linear(dim, vocab)

        def __call__(self, tokens):
            mask = nn.MultiHeadAttention.create_additive_causal_mask(tokens.shape[1])
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x, mask)
            return self.out(x)

    mx.random.seed(0)
    model = LM()
    optimizer = optim.AdamW(learning_rate=1e-3)
    tokens = mx.random.randint(0, vocab, (batch, seq + 1), key=mx.random.key(2))

    def loss_fn(m, x, y):
        return nn.losses.cross_entropy(m(x), y, reduction="mean")

    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    x, y = tokens[:, :-1], tokens[:, 1:]
    for _ in range(2):  # warm-up: tracing, JIT compile
        mx.eval(step(x, y), state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step(x, y)
        mx.eval(loss, state)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1000, loss.item()


def worker(args: argparse.Namespace) -> None:
    """Measure this process's BLAS and print one JSON line."""
    import mlx.core as mx
    import numpy as np

    result = {"blas": fastpath.blas_in_use()}
    result["matmul_gflops"] = matmul_gflops(args.size, args.repeats)
    result["train_step_ms"], result["train_loss"] = train_step_ms(args.steps)
    a = mx.random.normal((512, 512), key=mx.random.key(3))
    b = mx.random.normal((512, 512), key=mx.random.key(4))
    np.save(args.worker, np.array(a @ b), allow_pickle=False)
    print(json.dumps(result))


def run_config(name: str, preload: str | None, extra_env: dict[str, str | None], args, out_dir: str) -> dict:
    """Run the worker under one BLAS configuration and return its measurements."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "RAGMLX_REEXEC")}
    env.update(extra_env, RAGMLX_FAST_BLAS="0")
    env = {k: v for k, v in env.items() if v is not None}  # None in extra_env unsets the variable
    if preload is not None:
        env["LD_PRELOAD"] = preload
    matrix = os.path.join(out_dir, f"{name}.npy")
    cmd = [sys.executable, __file__, "--worker", matrix, "--size", str(args.size)]
    cmd += ["--repeats", str(args.repeats), "--steps", str(args.steps)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench config {name} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(config=name, preload=preload, env=extra_env, wall_s=time.perf_counter() - start, matrix=matrix)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=2048, help="matmul side (default 2048)")
    parser.add_argument("--repeats", type=int, default=3, help="timed matmuls per config (best is kept)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per config (median is kept)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per config (best is kept)")
    parser.add_argument("--skip_reference", action="store_true", help="skip the slow reference-BLAS run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "blas_results.json"), help="results JSON path")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    import numpy as np

    configs: list[tuple[str, str | None, dict[str, str]]] = []
    if not args.skip_reference:
        configs.append(("reference", None, {}))
    openblas, mkl = _openblas_path(), _mkl_path()
    if openblas:
        configs += [
            ("openblas", openblas, {}),
            ("openblas-1thread", openblas, {"OPENBLAS_NUM_THREADS": "1"}),
        ]
        if os.environ.get("OPENBLAS_CORETYPE"):  # the environment pins OpenBLAS's kernels: also time its own pick
            configs.append(("openblas-own-kernels", openblas, {"OPENBLAS_CORETYPE": None}))
    if mkl:
        configs += [("mkl", mkl, {}), ("mkl-1thread", mkl, {"MKL_NUM_THREADS": "1"})]

    with tempfile.TemporaryDirectory() as out_dir:
        # Rounds interleave the configs so load from other processes hits all of them alike; best is kept.
        samples: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
        for round_index in range(args.rounds):
            for name, preload, extra in configs:
                if name == "reference" and round_index > 0:
                    continue  # ~30x slower than the rest; one round says enough
                print(f"round {round_index + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                samples[name].append(run_config(name, preload, extra, args, out_dir))
        results = []
        for name, runs in samples.items():
            best = dict(runs[0])
            best["matmul_gflops"] = max(r["matmul_gflops"] for r in runs)
            best["train_step_ms"] = min(r["train_step_ms"] for r in runs)
            best["samples"] = [{"matmul_gflops": r["matmul_gflops"], "train_step_ms": r["train_step_ms"]} for r in runs]
            results.append(best)
        base = np.load(results[0]["matrix"], allow_pickle=False)
        for r in results:
            r["max_abs_diff_vs_" + results[0]["config"]] = float(np.abs(np.load(r.pop("matrix")) - base).max())

    diff_key = "max_abs_diff_vs_" + results[0]["config"]
    ref_ms = results[0]["train_step_ms"]
    print(f"\n{'config':18} {'GFLOP/s':>8} {'step ms':>8} {'speedup':>8} {'loss':>8} {'maxdiff':>9}  library")
    for r in results:
        print(
            f"{r['config']:18} {r['matmul_gflops']:8.1f} {r['train_step_ms']:8.1f} {ref_ms / r['train_step_ms']:7.1f}x"
            f" {r['train_loss']:8.4f} {r[diff_key]:9.2e}  {r['blas']}"
        )
    info = {
        "machine": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": _mlx_version(),
        "matmul_size": args.size,
        "rounds": args.rounds,
        "load_average_at_end": os.getloadavg(),
        "train_model": "2-layer pre-norm transformer LM, dim 256, 4 heads, seq 128, batch 8, vocab 1024, AdamW",
        "results": results,
    }
    Path(args.out).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {args.out}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mlx_version() -> str:
    import mlx.core as mx

    return mx.__version__


if __name__ == "__main__":
    main()
