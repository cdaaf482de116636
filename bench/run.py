"""Benchmark suite: our MLX models and search against PyTorch / faiss references, measured in one run.

    python bench/run.py [--quick] [--skip_main] [--profile] [--gpu [--tf32]]

Prints one table and writes bench/results.json. MLX runs in this process, re-executed with a fast BLAS exactly as
main.py does; with --gpu, on MLX's GPU backend (no re-exec) against torch on the same GPU. PyTorch and faiss run in
one subprocess (bench/torch_worker.py) started with the user's own environment (no BLAS preload), so neither
framework's threads disturb the other's timings. The two sides' timings are interleaved (one MLX sample, one
reference sample, repeat) so that load from other processes hits both alike; each figure is the median of the
samples. Arrays travel between the processes through safetensors files, commands as JSON lines.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from workload import ANSWER_LEN, BATCH, CONTEXT, K_PASSAGES, QLEN, ROOT, SIZES, VOCAB

sys.path.insert(0, str(ROOT))  # the project's modules, for the figures' MLX side

from figures import fig_decode, fig_embed, fig_gemm, fig_main, fig_search, fig_train  # noqa: E402
from harness import Worker  # noqa: E402


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}" if abs(v) >= 10 else f"{v:,.2f}"


def table(rows: list[dict], header: bool = True) -> str:
    lines = ["| figure | ours (MLX) | reference | ratio (best samples) |", "|---|---|---|---|"] if header else []
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        if r.get("ratio_best") is not None:
            ratio += f" ({r['ratio_best']:.2f}x)"
        ref = r["reference_name"] if r["reference"] is None else f"{fmt(r['reference'])} ({r['reference_name']})"
        ours = f"{fmt(r['ours'])} ({r['ours_name']})"
        if "peak_rss_mib" in r:
            ours += f", peak RSS {r['peak_rss_mib']:,.0f} MiB"
        lines.append(f"| {r['figure']} | {ours} | {ref} | {ratio} |")
    return "\n".join(lines)


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"system": platform.system(), "machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version()}


def blas_threads(path: str | None) -> int | None:
    """Threads of the BLAS library at `path` (OpenBLAS or MKL), or None when it cannot say."""
    import ctypes

    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return None
    for name in ("openblas_get_num_threads", "MKL_Get_Max_Threads"):
        if hasattr(lib, name):
            return int(getattr(lib, name)())
    return None


def set_environment(argv: list[str]) -> None:
    """Apply --threads and --tf32 through the environment, before any BLAS, OpenMP runtime or MLX is loaded (or
    this process re-executed), and so that the reference process inherits them."""
    args = build_parser().parse_known_args(argv)[0]
    if args.threads is not None and args.threads > 0:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    # MLX's CUDA backend runs fp32 matmuls in TF32 unless MLX_ENABLE_TF32=0; torch keeps full fp32 unless told.
    os.environ["MLX_ENABLE_TF32"] = os.environ["RAGMLX_BENCH_TF32"] = "1" if args.tf32 else "0"


def torch_device(gpu: bool) -> str:
    """The torch device that runs on the GPU MLX uses: CUDA on Linux, MPS (Metal) on macOS; else the CPU."""
    return ("mps" if platform.system() == "Darwin" else "cuda") if gpu else "cpu"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(  # no abbreviations: __main__ looks for "--gpu" itself, before parsing
        description="Benchmark our MLX models, search and pipeline against references.", allow_abbrev=False
    )
    p.add_argument("--quick", action="store_true",
                   help="same as --sizes small, and 512 chunks to embed instead of 2048")
    p.add_argument("--sizes", default="small,large",
                   help="small: dim 256 models and 100k search; large: dim 1024 models and 1M search")
    p.add_argument("--skip_main", action="store_true", help="skip timing `main.py --target all` (many minutes)")
    p.add_argument("--profile", action="store_true", help="also break the dim-256 MLX training steps down")
    p.add_argument("--main_args", default="", help="extra flags for the main.py run, e.g. \"--num_iters 100\"")
    p.add_argument("--no_torch_compile", action="store_true", help="skip the torch.compile reference")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for both frameworks (OMP/OPENBLAS/MKL_NUM_THREADS, set before MLX's BLAS or torch "
                        "load); default: each library's own (all cores)")
    p.add_argument("--repeats", type=int, default=3, help="timed samples per measurement (the median is kept)")
    p.add_argument("--only", default="train,search,decode,embed,main",
                   help="comma-separated figures to run: train,search,decode,embed,main")
    p.add_argument("--gpu", action="store_true",
                   help="time MLX on its GPU backend (mlx[cuda] on Linux, Metal on macOS) against torch on the same "
                        "GPU; search against torch's matmul + topk instead of faiss; --profile is CPU only")
    p.add_argument("--tf32", action="store_true",
                   help="with --gpu: fp32 matmuls in TF32 on both sides (MLX's CUDA default, torch's 'high' "
                        "precision); default: full fp32 on both")
    p.add_argument("--out", default=str(ROOT / "bench" / "results.json"), help="where to write the JSON results")
    return p


def main(argv: list[str], blas_line: str) -> int:
    args = build_parser().parse_args(argv)
    figures = set(args.only.split(","))
    sizes = ["small"] if args.quick else args.sizes.split(",")
    unknown = figures - {"train", "search", "decode", "embed", "main"}
    problem = (f"--only: unknown figure(s) {sorted(unknown)}" if unknown else
               "--threads must be positive" if args.threads is not None and args.threads <= 0 else
               f"--sizes: expected small and/or large, got {args.sizes!r}" if not set(sizes) <= set(SIZES) else
               "--repeats must be positive" if args.repeats <= 0 else
               "--tf32 needs --gpu" if args.tf32 and not args.gpu else None)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.skip_main:
        figures.discard("main")
    import mlx.core as mx
    import numpy as np

    import cores
    import fastpath

    if args.gpu:  # as main.py --gpu sets up the device
        if not (mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())):
            print("error: --gpu: this MLX build has no GPU backend (mlx[cuda13] or mlx[cuda12] on Linux)",
                  file=sys.stderr)
            return 2
        mx.set_default_device(mx.gpu)
        cores.configure(1)
    else:
        mx.set_default_device(mx.cpu)
        fastpath.keep_freed_memory()  # as main.py sets up the CPU
        cores.configure(args.threads or 0)  # --threads N: N streams of one BLAS thread each, as torch N threads
    device = torch_device(args.gpu)
    cfg = {"warmup": 1, "steps": 1, "repeats": args.repeats, "no_torch_compile": args.no_torch_compile,
           "embed_chunks": 512 if args.quick else 2048, "profile": args.profile and not args.gpu, "device": device}
    load_start, started = os.getloadavg(), time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ragmlx-bench-") as tmp:
        workdir = Path(tmp)
        worker = Worker(workdir / "worker.log")
        try:
            info = worker("info", device=device)
            rows.append(fig_gemm(worker, max(args.repeats, 5), device))
            print(table(rows), flush=True)
            steps: list[Callable[[], list[dict]]] = []
            if "train" in figures:
                for size in sizes:
                    for kind in ("retriever", "generator"):
                        steps.append(lambda k=kind, s=size: fig_train(worker, k, s, cfg, workdir))
            if "search" in figures:
                for n in [{"small": 100_000, "large": 1_000_000}[size] for size in sizes]:
                    steps.append(lambda n=n: [fig_search(worker, n, cfg, workdir)])
            if "decode" in figures:
                for size in sizes:
                    steps.append(lambda s=size: fig_decode(cfg, s))
            if "embed" in figures:
                steps.append(lambda: [fig_embed(worker, cfg, workdir)])
            if "main" in figures:
                steps.append(lambda: fig_main(workdir, ["--gpu"] * args.gpu + shlex.split(args.main_args)))
            for fn in steps:
                new = fn()
                rows.extend(new)
                print(table(new, header=False), flush=True)
        finally:
            worker.close()
    results = {
        "command": " ".join(["python", "bench/run.py", *argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "device": device,
        "gpu": info.get("gpu"),
        "cuda": info.get("cuda"),
        "float32_matmul": ("TF32" if args.tf32 else "full fp32") if args.gpu else "fp32 (CPU)",
        "torch_float32_matmul_precision": info["float32_matmul_precision"],
        "versions": {"mlx": mx.__version__, "numpy": np.__version__, "torch": info["torch"], "faiss": info["faiss"]},
        "blas": fastpath.blas_in_use(),
        "startup": blas_line,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "torch_blas": info["torch_blas"],
        "torch_threads": info["threads"],
        "mlx_blas_threads": blas_threads(fastpath.mlx_blas_library()),
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "wall_s": time.perf_counter() - started,
        "protocol": {"warmup_steps": cfg["warmup"], "steps_per_sample": cfg["steps"], "samples": cfg["repeats"],
                     "statistic": "median of interleaved samples (GEMM: best)"},
        "shapes": {"vocab": VOCAB, "context": CONTEXT, "batch": BATCH, "question": QLEN, "passages": K_PASSAGES,
                   "answer": ANSWER_LEN, "sizes": SIZES},
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(results, indent=1, default=float) + "\n")
    m = results["machine"]
    where = f"GPU {info.get('gpu') or device}, {results['float32_matmul']}" if args.gpu else f"MLX BLAS: {results['blas']}"
    print(f"\n{results['date']}  {m['cpu']}, {m['cores']} cores  {where}  "
          f"load {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(table(rows))
    print(f"wrote {args.out} ({results['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    import fastpath
    import cores

    set_environment(sys.argv[1:])
    if "--gpu" in sys.argv[1:]:  # the CPU's BLAS times nothing here
        line = fastpath.fast_blas_disabled("--gpu")
    else:
        cores.widen_graph_order()  # as main.py: before MLX evaluates anything; inherited by the re-exec
        line = fastpath.ensure_fast_blas(sys.argv)  # may re-exec this process with a fast BLAS preloaded
    print(line, flush=True)
    sys.exit(main(sys.argv[1:], line))
