"""Data-parallel throughput (1 vs N processes under `mlx.launch`) and exact vs approximate search at scale.

    python bench/scaling.py [--processes 2] [--ann_rows 1000000] [--skip_parallel] [--skip_ann] [--skip_disk]

Training: the default retriever (dim 128, 2 blocks) on synthetic token batches, global batch 32 questions + 32
positives + 32 negatives, gathered negatives, steps/s after warm-up. Indexing: chunks/s of `index.load_or_build`
(every process streams its share into its own shard file). Search: `--ann_rows` random unit vectors of dim 64,
1,000 random unit queries; exact top-10 (in memory, as 2 shards merged), faiss IVF-Flat and usearch HNSW: build
time, batch and single-query latency, recall@10 against exact. Random vectors are the hardest case for
approximate search (no clusters), so its recall here is a lower bound for real embeddings. Out of core:
`--disk_rows` vectors written to an .npy shard and searched memory-mapped, one block of rows at a time, with
the process's peak anonymous memory (what the index would need if it were loaded) sampled while it runs.
Writes bench/scaling_results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB, CONTEXT, QLEN, BATCH = 4096, 64, 16, 32


def worker(out: Path, train_steps: int, index_chunks: int) -> None:
    """Runs in every process (alone or under mlx.launch); rank 0 writes the figures."""
    import mlx.core as mx
    import numpy as np

    import distributed as dist
    import index as chunk_index
    import retriever as R
    import training as T

    mx.set_default_device(mx.cpu)
    mx.random.seed(0)
    _, rank, size = dist.world()
    model = R.Retriever(R.ModelArgs(vocab_size=VOCAB))
    cfg = T.TrainConfig(batch_size=BATCH, num_iters=train_steps, lr_warmup=0, steps_per_report=10**6,
                        steps_per_eval=10**6)
    optimizer = T.make_optimizer(cfg)
    rng = np.random.default_rng(0)
    questions = rng.integers(4, VOCAB, size=(BATCH, QLEN))
    chunks = rng.integers(4, VOCAB, size=(2 * BATCH, CONTEXT))
    mask = np.zeros((BATCH, 2 * BATCH), bool)
    loss_fn, shard = R.parallel_loss()
    batch = (questions, chunks, mask) if size == 1 else shard((questions, chunks, mask), rank, size)
    step = T.build_step(model, optimizer, loss_fn, cfg.grad_clip, compile=False)
    arrays = [mx.array(b) for b in batch]
    for _ in range(3):  # warm-up
        mx.eval(step(*arrays), model.state, optimizer.state)
    dist.barrier()
    tic = time.perf_counter()
    for _ in range(train_steps):
        mx.eval(step(*arrays), model.state, optimizer.state)
    dist.barrier()
    train_s = time.perf_counter() - tic
    tokens = rng.integers(4, VOCAB, size=(index_chunks, CONTEXT)).astype(np.int32)
    chunk_index.embed(model, tokens[:256])  # warm-up
    dist.barrier()
    tic = time.perf_counter()
    index = chunk_index.load_or_build(model, "bench", tokens, out.parent / "index", log=lambda _: None)
    index_s = time.perf_counter() - tic
    if rank == 0:
        out.write_text(json.dumps({
            "processes": size, "train_steps_per_s": train_steps / train_s,
            "train_questions_per_s": train_steps * BATCH / train_s,
            "index_chunks_per_s": index_chunks / index_s, "index_rows": int(index.shape[0]),
        }))


def run_parallel(processes: int, train_steps: int, index_chunks: int) -> list[dict]:
    results = []
    launcher = shutil.which("mlx.launch")
    for n in sorted({1, processes}):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, "--worker", str(out), "--train_steps", str(train_steps),
                   "--index_chunks", str(index_chunks)]
            if n > 1:
                if launcher is None:
                    print("mlx.launch not found: skipping the multi-process run")
                    continue
                cmd = [launcher, "-n", str(n), "--backend", "ring", "-p", "41234", "--", *cmd]
            subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
            results.append(json.loads(out.read_text()))
            print(results[-1], flush=True)
    return results


def timed(fn, repeat: int = 3) -> float:
    """Best of `repeat` wall times of `fn()` (other processes on the machine only ever add time)."""
    best = float("inf")
    for _ in range(repeat):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return best


def run_ann(rows: int, usearch_rows: int, dim: int = 64, queries: int = 1000, k: int = 10) -> dict:
    import mlx.core as mx
    import numpy as np

    import index as chunk_index

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((rows, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q = rng.standard_normal((queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    emb_mx, q_mx = mx.array(emb), mx.array(q)
    _, exact_ids = chunk_index.search(q_mx, emb_mx, k)
    out = {"rows": rows, "dim": dim, "queries": queries, "k": k, "index_mib_fp32": emb.nbytes / 2**20}
    out["exact"] = {"batch_ms_per_query": 1e3 * timed(lambda: chunk_index.search(q_mx, emb_mx, k))
                    / queries,
                    "single_query_ms": 1e3 * timed(lambda: chunk_index.search(q_mx[:1], emb_mx, k), 10),
                    "recall": 1.0}
    sharded = chunk_index.ShardedIndex([emb_mx[: rows // 2], emb_mx[rows // 2 :]])
    _, sharded_ids = chunk_index.search(q_mx, sharded, k)
    out["exact_2_shards"] = {
        "batch_ms_per_query": 1e3 * timed(lambda: chunk_index.search(q_mx, sharded, k)) / queries,
        "single_query_ms": 1e3 * timed(lambda: chunk_index.search(q_mx[:1], sharded, k), 10),
        "same_top_k_as_one_shard": bool((sharded_ids == exact_ids).all()),
    }
    print({k_: v for k_, v in out.items()}, flush=True)
    builders = {"faiss": chunk_index._faiss_build, "usearch": chunk_index._usearch_build}
    for kind, build in builders.items():
        # HNSW construction is slow on few cores: usearch indexes the first `usearch_rows` rows only.
        n = rows if kind == "faiss" else min(rows, usearch_rows)
        exact_n = exact_ids if n == rows else chunk_index.search(q_mx, emb_mx[:n], k)[1]
        try:
            tic = time.perf_counter()
            backend, params = build(emb[:n])
            built = time.perf_counter() - tic
        except ImportError as e:
            out[kind] = {"skipped": str(e)}
            continue
        index = chunk_index.ApproximateIndex(kind, backend, n, dim)
        variants = [(params, backend)]
        if kind == "faiss":  # the recall/speed trade-off: more inverted lists probed per query
            variants = [(dict(params, nprobe=p), backend) for p in sorted({params["nprobe"], 16, 64, 256}) if p <= params["nlist"]]
        for p, _ in variants:
            if kind == "faiss":
                backend.nprobe = p["nprobe"]
            name = f"{kind}" + (f"_nprobe{p['nprobe']}" if kind == "faiss" else "")
            _, ids = index.search(q, k)
            recall = float(np.mean([len(set(a) & set(e)) / k for a, e in zip(ids.tolist(), exact_n.tolist())]))
            out[name] = {"rows": n, "params": p, "build_s": built, "recall": recall,
                         "batch_ms_per_query": 1e3 * timed(lambda: index.search(q, k)) / queries,
                         "single_query_ms": 1e3 * timed(lambda: index.search(q[:1], k), 10)}
            print(name, out[name], flush=True)
    return out


def anon_memory_mib() -> float:
    """This process's resident anonymous memory (heap, not file pages mapped from disk), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_out_of_core(rows: int, dim: int = 64, queries: int = 1000, k: int = 10, rows_per_block: int = 1 << 20) -> dict:
    """Search an index that is never loaded: an .npy shard memory-mapped, read one block of rows at a time."""
    import threading

    import mlx.core as mx
    import numpy as np

    import index as chunk_index

    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "disk.embedding-0-of-1.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
        for i in range(0, rows, rows_per_block):  # written a block at a time, like index.write_shard
            block = rng.standard_normal((min(rows_per_block, rows - i), dim), dtype=np.float32)
            out[i : i + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        out.flush()
        del out
        chunk_index.write_manifest(tmp, "disk", "disk", rows, dim, 1)
        q = rng.standard_normal((queries, dim), dtype=np.float32)
        q = mx.array(q / np.linalg.norm(q, axis=1, keepdims=True))
        index = chunk_index.open_sharded(chunk_index.manifest_path(tmp, "disk"), "disk", rows, in_memory=False)
        index.rows_per_block = rows_per_block
        base, peak, done = anon_memory_mib(), [0.0], threading.Event()

        def sample():
            while not done.wait(0.01):
                peak[0] = max(peak[0], anon_memory_mib())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        tic = time.perf_counter()
        _, ids = chunk_index.search(q, index, k)
        seconds = time.perf_counter() - tic
        done.set()
        sampler.join()
        # the same rows in memory, for the exact answer and the speed of an index that fits
        loaded = mx.array(np.load(path))
        tic = time.perf_counter()
        _, want = chunk_index.search(q, loaded, k)
        in_memory_s = time.perf_counter() - tic
    result = {
        "rows": rows, "dim": dim, "index_mib": rows * dim * 4 / 2**20, "rows_per_block": rows_per_block,
        "queries": queries, "memory_mapped_s": seconds, "in_memory_s": in_memory_s,
        "anon_mib_before": base, "anon_mib_peak_while_searching": peak[0],
        "same_top_k_as_in_memory": bool((ids == want).all()),
    }
    print("out of core", result, flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--train_steps", type=int, default=20)
    p.add_argument("--index_chunks", type=int, default=8192)
    p.add_argument("--ann_rows", type=int, default=1_000_000)
    p.add_argument("--usearch_rows", type=int, default=1_000_000, help="rows for the (slow to build) HNSW index")
    p.add_argument("--disk_rows", type=int, default=8_000_000, help="rows of the memory-mapped index (2 GiB at 8M)")
    p.add_argument("--skip_parallel", action="store_true")
    p.add_argument("--skip_ann", action="store_true")
    p.add_argument("--skip_disk", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "scaling_results.json"))
    args = p.parse_args()
    if args.worker:
        return worker(Path(args.worker), args.train_steps, args.index_chunks)
    import fastpath

    print(fastpath.ensure_fast_blas(sys.argv), flush=True)  # re-execs with OpenBLAS; workers inherit LD_PRELOAD
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
              "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(), "blas": fastpath.blas_in_use()}
    if not args.skip_parallel:
        report["parallel"] = run_parallel(args.processes, args.train_steps, args.index_chunks)
    if not args.skip_ann:
        report["search"] = run_ann(args.ann_rows, args.usearch_rows)
    if not args.skip_disk:
        report["out_of_core"] = run_out_of_core(args.disk_rows)
    report["load_average_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
