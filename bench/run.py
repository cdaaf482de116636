"""Benchmark suite: our MLX models and search against PyTorch / faiss references, measured in one run.

    python bench/run.py [--quick] [--skip_main] [--profile]

Prints one table and writes bench/results.json. MLX runs in this process (re-executed with a fast BLAS exactly as
main.py does); PyTorch and faiss run in `--worker` subprocesses with the user's own environment, so neither
framework's threads or BLAS preload disturb the other's timings. Arrays travel through safetensors files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB, CONTEXT, BATCH, QLEN, K_PASSAGES, ANSWER_LEN = 10_000, 64, 32, 16, 5, 16
SIZES = {"small": dict(dim=256, num_blocks=4, num_heads=4), "large": dict(dim=1024, num_blocks=4, num_heads=8)}


# ----------------------------------------------------------------------------------------------- shared helpers


def timed(fn, warmup: int, steps: int, repeats: int) -> dict:
    """Seconds per call of `fn` (which must block until done): median over `repeats` runs of `steps` calls."""
    tic = time.perf_counter()
    for _ in range(warmup):
        fn()
    first = time.perf_counter() - tic
    samples = []
    for _ in range(repeats):
        tic = time.perf_counter()
        for _ in range(steps):
            fn()
        samples.append((time.perf_counter() - tic) / steps)
    return {"s": statistics.median(samples), "samples": samples, "warmup_s": first}


def make_batches(kind: str, seed: int = 0) -> dict:
    """Synthetic numpy batches of the benchmark shapes, with PAD tails as real batches have."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def rows(n, width, min_len):
        t = rng.integers(4, VOCAB, size=(n, width), dtype=np.int32)
        lengths = rng.integers(min_len, width + 1, size=n)
        t[np.arange(width)[None, :] >= lengths[:, None]] = 0
        return t

    if kind == "retriever":
        chunks = 2 * BATCH
        mask = np.eye(BATCH, chunks, dtype=bool) | (rng.random((BATCH, chunks)) < 0.02)
        return {"questions": rows(BATCH, QLEN, 6), "chunks": rows(chunks, CONTEXT, 40), "positive_mask": mask}
    q = rows(BATCH, QLEN, 6)
    c = rows(BATCH * K_PASSAGES, CONTEXT, 40).reshape(BATCH, K_PASSAGES, CONTEXT)
    sep = np.full((BATCH, K_PASSAGES, 1), 3, dtype=np.int32)
    passages = np.concatenate([np.broadcast_to(q[:, None], (BATCH, K_PASSAGES, QLEN)), sep, c], axis=2)
    answers = rows(BATCH, ANSWER_LEN, 2)
    answer_in = np.concatenate([np.full((BATCH, 1), 2, np.int32), answers[:, :-1]], axis=1)
    return {"passages": np.ascontiguousarray(passages), "answer_in": answer_in, "answer_out": answers}


def batch_tokens(kind: str) -> int:
    """Positions processed per training step, padding included (the compute is dense)."""
    if kind == "retriever":
        return BATCH * QLEN + 2 * BATCH * CONTEXT
    return BATCH * K_PASSAGES * (QLEN + 1 + CONTEXT) + BATCH * ANSWER_LEN


def train_flops(kind: str, dim: int, num_blocks: int, num_heads: int) -> float:
    """Matmul FLOPs of one training step (forward x 3): 6 x weights per token plus attention and the tied output."""

    def encoder(n_seqs, L):
        return n_seqs * num_blocks * (24 * L * dim * dim + 4 * L * L * dim)

    if kind == "retriever":
        fwd = encoder(BATCH, QLEN) + encoder(2 * BATCH, CONTEXT) + 2 * 3 * BATCH * dim * 128
        return 3.0 * fwd
    Lp, T = QLEN + 1 + CONTEXT, ANSWER_LEN
    S = K_PASSAGES * Lp
    per_block = 28 * T * dim * dim + 4 * S * dim * dim + 4 * T * T * dim + 4 * T * S * dim
    fwd = encoder(BATCH * K_PASSAGES, Lp) + BATCH * (num_blocks * per_block + 2 * T * dim * VOCAB)
    return 3.0 * fwd


def worker_env() -> dict:
    """This process's environment minus the BLAS preload fastpath added, i.e. what the user started us with."""
    env = dict(os.environ)
    if env.pop("RAGMLX_REEXEC", None) == "1":
        rest = env.get("LD_PRELOAD", "").split(":")[1:]
        if rest:
            env["LD_PRELOAD"] = ":".join(rest)
        else:
            env.pop("LD_PRELOAD", None)
    return env


def call_worker(task: str, spec: dict, timeout: float = 3600) -> dict:
    """Run `bench/run.py --worker TASK SPEC` and return the JSON object on its last stdout line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", task, json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {task} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def row(figure: str, ours: float, reference: float | None, unit: str, ours_name: str, reference_name: str,
        **details) -> dict:
    ratio = ours / reference if reference else None
    return {"figure": figure, "ours": ours, "reference": reference, "ratio": ratio, "unit": unit,
            "ours_name": ours_name, "reference_name": reference_name, **details}


# ----------------------------------------------------------------------------------------------- MLX side


def mlx_gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b)
    return 2 * n**3 / timed(lambda: mx.eval(a @ b), 1, 1, repeats)["s"] / 1e9


def mlx_model(kind: str, size: dict):
    import mlx.core as mx

    mx.random.seed(0)
    if kind == "retriever":
        import retriever as R

        return R.Retriever(R.ModelArgs(vocab_size=VOCAB, **size)), R.contrastive_loss
    import generator as G

    args = G.ModelArgs(vocab_size=VOCAB, num_decoder_blocks=size["num_blocks"], **size)
    return G.Generator(args), G.seq2seq_loss


def fig_train(kind: str, size_name: str, cfg: dict, peaks: dict, workdir: Path, profile: bool) -> list[dict]:
    """Figure 1: training tokens/s of our compiled step vs the same model in PyTorch (eager, torch.compile)."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    import training as T

    size = SIZES[size_name]
    model, loss_fn = mlx_model(kind, size)
    mx.eval(model.parameters())
    batch_np = make_batches(kind)
    batch = [mx.array(v) for v in batch_np.values()]
    params = T.count_parameters(model)
    initial_loss = loss_fn(model, *batch)[0].item()
    weights = workdir / f"{kind}_{size_name}.safetensors"
    mx.save_safetensors(str(weights), dict(tree_flatten(model.parameters())))
    batch_file = workdir / f"{kind}_batch.safetensors"
    mx.save_safetensors(str(batch_file), {k: mx.array(v) for k, v in batch_np.items()})

    optimizer = optim.AdamW(learning_rate=1e-3, weight_decay=0.01)
    step = T.build_step(model, optimizer, loss_fn, grad_clip=1.0, compile=True)

    def run():
        loss, aux = step(*batch)
        mx.eval(loss, aux, model.state, optimizer.state)

    ours = timed(run, cfg["warmup"], cfg["steps"], cfg["repeats"])
    spec = {"kind": kind, "size": size, "weights": str(weights), "batch": str(batch_file), "params": params,
            "batch_keys": list(batch_np), "copy": bool(getattr(model.args, "copy", False)),
            **{k: cfg[k] for k in ("warmup", "steps", "repeats")}, "compile": not cfg["no_torch_compile"]}
    ref = call_worker("train", spec)
    if abs(ref["initial_loss"] - initial_loss) > 1e-3 * max(1.0, abs(initial_loss)):
        raise AssertionError(f"{kind}: torch loss {ref['initial_loss']:.6f} != MLX loss {initial_loss:.6f} "
                             f"with the same weights: the architectures differ")
    tokens, flops = batch_tokens(kind), train_flops(kind, **size)
    label = f"{kind} train {size['dim']}d tok/s"
    common = dict(params=params, tokens_per_step=tokens, flops_per_step=flops, initial_loss_mlx=initial_loss,
                  initial_loss_torch=ref["initial_loss"], mlx_timing=ours)
    rows = [row(label, tokens / ours["s"], tokens / ref["eager"]["s"], "tok/s", "MLX compiled step",
                "torch eager", torch_timing=ref["eager"], **common)]
    mlx_frac = flops / ours["s"] / 1e9 / peaks["mlx"]
    torch_frac = flops / ref["eager"]["s"] / 1e9 / peaks["torch"]
    rows.append(row(f"{kind} train {size['dim']}d % of GEMM peak", 100 * mlx_frac, 100 * torch_frac, "%",
                    "MLX compiled step", "torch eager"))
    compiled = ref.get("compiled", {})
    if "s" in compiled:
        rows.append(row(label, tokens / ours["s"], tokens / compiled["s"], "tok/s", "MLX compiled step",
                        "torch.compile", torch_timing=compiled))
    else:
        rows.append(row(label, tokens / ours["s"], None, "tok/s", "MLX compiled step",
                        f"torch.compile skipped: {compiled.get('error', 'disabled')[:80]}"))
    if profile:
        rows[0]["profile"] = profile_step(kind, model, loss_fn, batch, cfg)
    return rows


def profile_step(kind: str, model, loss_fn, batch, cfg: dict) -> dict:
    """Where the step's time goes: forward only, forward+backward, full step, and output projection + CE alone."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    import training as T

    reps = dict(warmup=1, steps=cfg["steps"], repeats=cfg["repeats"])
    fwd = mx.compile(lambda *b: loss_fn(model, *b)[0])
    grad = nn.value_and_grad(model, lambda m, *b: loss_fn(m, *b)[0])
    out = {
        "forward_eager_s": timed(lambda: mx.eval(loss_fn(model, *batch)), **reps)["s"],
        "forward_compiled_s": timed(lambda: mx.eval(fwd(*batch)), **reps)["s"],
        "forward_backward_eager_s": timed(lambda: mx.eval(grad(model, *batch)), **reps)["s"],
    }
    opt = optim.AdamW(learning_rate=1e-3, weight_decay=0.01)
    eager_step = T.build_step(model, opt, loss_fn, grad_clip=1.0, compile=False)
    out["step_uncompiled_s"] = timed(lambda: mx.eval(eager_step(*batch), model.state, opt.state), **reps)["s"]
    if kind == "generator":
        passages, answer_in, answer_out = batch
        out["encoder_forward_s"] = timed(lambda: mx.eval(model.encode(passages)), **reps)["s"]
        memory = model.encode(passages)
        mx.eval(memory)
        mask = answer_out != 0

        def nll(logp):
            picked = mx.take_along_axis(logp, answer_out[..., None], axis=-1).squeeze(-1)
            return -(picked * mask).sum() / mask.sum()

        # The decoder alone (memory fixed), forward + backward.
        dec = nn.value_and_grad(model, lambda m: nll(m.decode(answer_in, memory)))
        out["decoder_fwd_bwd_s"] = timed(lambda: mx.eval(dec(model)), **reps)["s"]
        # The tied output projection + log-softmax over the vocabulary alone, forward + backward; then with the
        # copy distribution scattered onto the vocabulary as generator.decode does.
        h = mx.random.normal((BATCH, ANSWER_LEN, model.args.dim))
        attn = mx.softmax(mx.random.normal((BATCH, ANSWER_LEN, memory.states.shape[1])), axis=-1)
        w = model.embed.weight
        B, T, S = attn.shape
        b = mx.broadcast_to(mx.arange(B)[:, None, None], (B, T, S))
        t = mx.broadcast_to(mx.arange(T)[None, :, None], (B, T, S))
        v = mx.broadcast_to(memory.tokens[:, None, :], (B, T, S))

        def vocab_head(h, w, attn):
            return nll(nn.log_softmax(h @ w.T, axis=-1))

        def copy_head(h, w, attn):
            copy = mx.zeros((B, T, w.shape[0])).at[b, t, v].add(attn)
            return nll(mx.log(0.5 * mx.softmax(h @ w.T, axis=-1) + 0.5 * copy + 1e-9))

        for name, fn in (("output_proj_logsoftmax_fwd_bwd_s", vocab_head), ("output_proj_copy_mix_fwd_bwd_s", copy_head)):
            g = mx.value_and_grad(fn, argnums=(0, 1, 2))
            out[name] = timed(lambda: mx.eval(g(h, w, attn)), **reps)["s"]
    return out


def fig_search(n: int, cfg: dict, workdir: Path) -> dict:
    """Figure 2: exact top-20 inner-product search, index.search vs faiss IndexFlatIP; same ids up to ties."""
    import mlx.core as mx
    import numpy as np

    import index

    rng = np.random.default_rng(n)
    emb = rng.standard_normal((n, 64), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    queries = rng.standard_normal((1000, 64), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    path = workdir / "search.safetensors"
    mx.save_safetensors(str(path), {"index": mx.array(emb), "queries": mx.array(queries)})
    q, e = mx.array(queries), mx.array(emb)
    mx.eval(q, e)
    result = {}

    def run():
        result["ids"] = index.search(q, e, 20)[1]

    ours = timed(run, 1, 1, cfg["repeats"])
    ref = call_worker("search", {"data": str(path), "k": 20, "repeats": cfg["repeats"]})
    theirs = mx.load(ref["ids_file"])["ids"]
    # Equal up to ties: the exact (float64) scores of both top-20 lists must agree position by position.
    exact = lambda ids: np.sort(np.einsum("qd,qkd->qk", queries.astype(np.float64), emb[ids].astype(np.float64)))  # noqa: E731
    ids_ours, ids_faiss = result["ids"], np.array(theirs).astype(np.int64)
    same_sets = np.mean([set(a) == set(b) for a, b in zip(ids_ours, ids_faiss)])
    if not np.allclose(exact(ids_ours), exact(ids_faiss), atol=1e-5):
        raise AssertionError(f"search at {n:,}: MLX and faiss top-20 differ beyond ties")
    return row(f"top-20 search {n // 1000}k x 64d q/s", 1000 / ours["s"], 1000 / ref["s"], "q/s",
               "index.search (MLX)", "faiss IndexFlatIP", rows_with_identical_id_sets=float(same_sets),
               mlx_timing=ours, faiss_timing={"s": ref["s"], "samples": ref["samples"]})


def fig_decode(cfg: dict) -> list[dict]:
    """Figure 3: greedy decoding tokens/s with the KV cache vs re-running the decoder on the whole prefix."""
    import mlx.core as mx

    model, _ = mlx_model("generator", SIZES["small"])
    mx.eval(model.parameters())
    passages_np = make_batches("generator")["passages"]
    rows = []
    for batch_size in (1, BATCH):
        passages = mx.array(passages_np[:batch_size])
        for length in (16, 64):
            got = {}

            def cached():
                got["cached"] = mx.stack(list(model.generate(passages, max_tokens=length)), axis=1)

            def recompute():
                got["recompute"] = model.generate_recompute(passages, length)

            ours = timed(cached, 1, 1, cfg["repeats"])
            ref = timed(recompute, 1, 1, cfg["repeats"])
            match = (mx.array(got["recompute"]) == got["cached"]).astype(mx.float32).mean().item()
            n = batch_size * length
            rows.append(row(f"decode B={batch_size} len={length} tok/s", n / ours["s"], n / ref["s"], "tok/s",
                            "generate (KV cache)", "generate_recompute", token_agreement=match,
                            cached_timing=ours, recompute_timing=ref))
    return rows


def fig_embed(cfg: dict, workdir: Path) -> dict:
    """Figure 4: chunk-embedding throughput of index.embed (retriever dim 256) vs the same model in torch."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import index

    model, _ = mlx_model("retriever", SIZES["small"])
    mx.eval(model.parameters())
    n = cfg["embed_chunks"]
    chunks = make_batches("retriever")["chunks"]
    chunks = chunks[[i % len(chunks) for i in range(n)]]
    ours = timed(lambda: mx.eval(index.embed(model, chunks)), 1, 1, cfg["repeats"])
    weights = workdir / "embed.safetensors"
    mx.save_safetensors(str(weights), dict(tree_flatten(model.parameters())))
    ref = call_worker("embed", {"weights": str(weights), "size": SIZES["small"], "chunks": n,
                                "repeats": cfg["repeats"]})
    return row(f"embed chunks (256d, {CONTEXT} tok) chunks/s", n / ours["s"], n / ref["s"], "chunks/s",
               "index.embed (MLX)", "torch eager, inference_mode", mlx_timing=ours, torch_timing=ref)


def fig_main(workdir: Path) -> list[dict]:
    """Figure 5: wall time and peak RSS of `main.py --target dataset`, `retriever`, `all`, run one after another."""
    save_dir = workdir / "main_run"
    rows = []
    for target in ("dataset", "retriever", "all"):
        log = workdir / f"main_{target}.log"
        cmd = [sys.executable, str(ROOT / "main.py"), "--target", target, "--save_dir", str(save_dir)]
        tic = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=worker_env(), cwd=ROOT)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - tic
        if proc.returncode != 0:
            tail = log.read_text()[-1500:]
            raise RuntimeError(f"main.py --target {target} exited {proc.returncode}:\n{tail}")
        rows.append(row(f"main.py --target {target} wall s", wall, None, "s", "main.py", "-",
                        peak_rss_mib=usage.ru_maxrss / 1024, log_tail=log.read_text()[-3000:]))
    return rows


# ----------------------------------------------------------------------------------------------- worker side


def worker(task: str, spec: dict) -> dict:
    """Reference measurements in PyTorch / faiss; runs in its own process."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    if task == "gemm":
        import torch

        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        s = timed(lambda: a @ b, 1, 1, spec["repeats"])["s"]
        return {"gflops": 2 * 2048**3 / s / 1e9, "torch": torch.__version__,
                "torch_blas": torch.__config__.show().split("\n")[3:6], "threads": torch.get_num_threads()}
    if task == "search":
        import faiss

        data = load_file(spec["data"])
        flat = faiss.IndexFlatIP(data["index"].shape[1])
        flat.add(data["index"])
        out = {}

        def run():
            out["ids"] = flat.search(data["queries"], spec["k"])[1]

        t = timed(run, 1, 1, spec["repeats"])
        ids_file = str(Path(spec["data"]).with_suffix(".faiss.safetensors"))
        save_file({"ids": out["ids"].astype(np.int64)}, ids_file)
        return {**t, "ids_file": ids_file, "faiss": faiss.__version__}

    import torch

    import torch_models as TM

    size = spec["size"]
    if task == "embed":
        model = TM.Retriever(VOCAB, **size)
        TM.load_flat(model, load_file(spec["weights"]))
        chunks = make_batches("retriever")["chunks"]
        chunks = torch.from_numpy(chunks[[i % len(chunks) for i in range(spec["chunks"])]]).long()

        def embed():
            with torch.inference_mode():
                return [model(chunks[i : i + 256]) for i in range(0, len(chunks), 256)]

        return timed(embed, 1, 1, spec["repeats"])

    assert task == "train", task
    arrays = load_file(spec["batch"])
    batch = [torch.from_numpy(arrays[k]) for k in spec["batch_keys"]]
    batch = [b if b.dtype == torch.bool else b.long() for b in batch]
    flat = load_file(spec["weights"])

    def fresh():
        if spec["kind"] == "retriever":
            m = TM.Retriever(VOCAB, **size)
        else:
            m = TM.Generator(VOCAB, size["dim"], size["num_blocks"], size["num_blocks"], size["num_heads"],
                             copy=spec["copy"])
        TM.load_flat(m, flat)
        if TM.count_parameters(m) != spec["params"]:
            raise AssertionError(f"torch has {TM.count_parameters(m):,} parameters, MLX {spec['params']:,}")
        return m

    loss_fn = TM.contrastive_loss if spec["kind"] == "retriever" else TM.seq2seq_loss
    model = fresh()
    result = {"initial_loss": float(loss_fn(model, *batch)[0])}

    def step_fn(m, loss):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)

        def step():
            opt.zero_grad(set_to_none=True)
            value, _ = loss(*batch)
            value.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()

        return step

    reps = {k: spec[k] for k in ("warmup", "steps", "repeats")}
    result["eager"] = timed(step_fn(model, lambda *b: loss_fn(model, *b)), **reps)
    if spec["compile"]:
        model = fresh()
        try:
            compiled = torch.compile(lambda *b: loss_fn(model, *b))
            result["compiled"] = timed(step_fn(model, compiled), **{**reps, "warmup": max(reps["warmup"], 2)})
        except Exception as e:  # inductor needs a working C++ toolchain; report why it was skipped
            result["compiled"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return result


# ----------------------------------------------------------------------------------------------- report


def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"


def table(rows: list[dict]) -> str:
    lines = ["| figure | ours (MLX) | reference | ratio |", "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        ref = f"{fmt(r['reference'])} ({r['reference_name']})" if r["reference"] is not None else (
            "-" if r["reference_name"] == "-" else r["reference_name"])
        lines.append(f"| {r['figure']} | {fmt(r['ours'])} ({r['ours_name']}) | {ref} | {ratio} |")
    return "\n".join(lines)


def machine() -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"system": platform.system(), "machine": platform.machine(), "cpu": model, "cores": os.cpu_count(),
            "python": platform.python_version()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark our MLX models, search and pipeline against references.")
    p.add_argument("--quick", action="store_true", help="dim 256 only, no 1M search, fewer repeats")
    p.add_argument("--skip_main", action="store_true", help="skip timing `main.py --target all` (minutes)")
    p.add_argument("--profile", action="store_true", help="also break the MLX training step down (forward, backward...)")
    p.add_argument("--no_torch_compile", action="store_true", help="skip the torch.compile reference")
    p.add_argument("--only", default=None, help="comma list of figures to run: train,search,decode,embed,main")
    p.add_argument("--out", default=str(ROOT / "bench" / "results.json"), help="where to write the JSON results")
    return p


def main(argv: list[str], blas_line: str) -> int:
    args = build_parser().parse_args(argv)
    import mlx.core as mx
    import numpy as np

    import fastpath

    mx.set_default_device(mx.cpu)
    figures = set((args.only or "train,search,decode,embed,main").split(","))
    if args.skip_main:
        figures.discard("main")
    cfg = {"warmup": 1, "steps": 1 if args.quick else 2, "repeats": 3, "no_torch_compile": args.no_torch_compile,
           "embed_chunks": 2048}
    load_start, started = os.getloadavg(), time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ragmlx-bench-") as tmp:
        workdir = Path(tmp)
        torch_info = call_worker("gemm", {"repeats": 5})
        peaks = {"mlx": mlx_gemm_gflops(), "torch": torch_info["gflops"]}
        rows.append(row("fp32 GEMM 2048^3 GFLOP/s", peaks["mlx"], peaks["torch"], "GFLOP/s", "MLX", "torch"))
        print(table(rows[-1:]), flush=True)
        sizes = ["small"] if args.quick else ["small", "large"]
        steps = []
        if "train" in figures:
            for size in sizes:
                for kind in ("retriever", "generator"):
                    large = size == "large"
                    run_cfg = {**cfg, "steps": 1, "repeats": 2} if large else cfg
                    steps.append(lambda k=kind, s=size, c=run_cfg: fig_train(k, s, c, peaks, workdir, args.profile and s == "small"))
        if "search" in figures:
            for n in [100_000] if args.quick else [100_000, 1_000_000]:
                steps.append(lambda n=n: [fig_search(n, cfg, workdir)])
        if "decode" in figures:
            steps.append(lambda: fig_decode(cfg))
        if "embed" in figures:
            steps.append(lambda: [fig_embed(cfg, workdir)])
        if "main" in figures:
            steps.append(lambda: fig_main(workdir))
        for fn in steps:
            new = fn()
            rows.extend(new)
            print("\n".join(table(new).splitlines()[2:]), flush=True)
    versions = {"mlx": mx.__version__, "numpy": np.__version__, "torch": torch_info["torch"]}
    try:
        import faiss  # only for its version string; the search itself runs in a worker

        versions["faiss"] = faiss.__version__
    except ImportError:
        pass
    results = {
        "command": " ".join(["python", "bench/run.py", *argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions,
        "blas": fastpath.blas_in_use(),
        "startup": blas_line,
        "torch_blas": torch_info["torch_blas"],
        "torch_threads": torch_info["threads"],
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "wall_s": time.perf_counter() - started,
        "shapes": {"vocab": VOCAB, "context": CONTEXT, "batch": BATCH, "question": QLEN, "passages": K_PASSAGES,
                   "answer": ANSWER_LEN, "sizes": SIZES},
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(results, indent=1, default=float) + "\n")
    print(f"\n{results['date']}  {results['machine']['cpu']} x{results['machine']['cores']}  {results['blas']}")
    print(table(rows))
    print(f"wrote {args.out} ({results['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        print(json.dumps(worker(sys.argv[2], json.loads(sys.argv[3])), default=float))
        sys.exit(0)
    import fastpath

    line = fastpath.ensure_fast_blas(sys.argv)  # may re-exec this process with a fast BLAS preloaded
    print(line, flush=True)
    sys.exit(main(sys.argv[1:], line))
