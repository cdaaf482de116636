"""The benchmark's figures: each measures our MLX code against its reference in the same run (training steps,
search, decoding, chunk embedding, the main command) and returns its result rows."""

from __future__ import annotations

import contextlib
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from harness import Worker, best_ratio, interleaved, row, worker_env
from workload import (
    ANSWER_LEN, BATCH, CONTEXT, ROOT, SIZES, VOCAB, batch_tokens, embed_chunks, make_batches, real_token_fraction,
    seconds, train_flops,
)


def mlx_model(kind: str, size: dict):
    import mlx.core as mx

    mx.random.seed(0)
    if kind == "retriever":
        import retriever as R

        model, loss = R.Retriever(R.ModelArgs(vocab_size=VOCAB, **size)), R.contrastive_loss
    else:
        import generator as G

        args = G.ModelArgs(vocab_size=VOCAB, num_decoder_blocks=size["num_blocks"], **size)
        model, loss = G.Generator(args), G.seq2seq_loss
    mx.eval(model.parameters())
    return model, loss


def packed_batch(kind: str, batch_np: dict) -> list:
    """The batch as main.py's training step gets it: with the packing plans its `prepare` adds (the encoders'
    position-wise layers then skip the padding), as `mx` arrays."""
    import cores
    import generator as G
    import retriever as R
    import training as T

    with_packings = R.with_packings if kind == "retriever" else G.with_packings
    return list(T.batch_to_mx(with_packings(tuple(batch_np.values()), cores.spreads())))


def save_weights(model, path: Path) -> str:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    mx.save_safetensors(str(path), dict(tree_flatten(model.parameters())))
    return str(path)


def gemm_candidates(worker: Worker, device: str, n: int = 2048) -> dict[str, Callable[[], float]]:
    """One n x n x n fp32 matmul in MLX and one in torch (on `device`), as `interleaved` candidates."""
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    worker("setup_gemm", n=n, device=device)
    # Each sample is the best of 3 matmuls, so that a single sample per repeat still finds the peak.
    return {"gemm_mlx": lambda: min(seconds(lambda: mx.eval(a @ b)) for _ in range(3)),
            "gemm_torch": lambda: worker("time", name="gemm", best_of=3)["s"]}


def gemm_peaks(t: dict, n: int = 2048) -> dict[str, float]:
    """GFLOP/s of the fastest GEMM sample of each framework."""
    return {k: 2 * n**3 / t[f"gemm_{k}"]["best"] / 1e9 for k in ("mlx", "torch")}


def fig_gemm(worker: Worker, repeats: int, device: str) -> dict:
    """Peak fp32 GEMM: a 2048^3 matmul in MLX and in torch (best of 3 x `repeats`)."""
    peaks = gemm_peaks(interleaved(gemm_candidates(worker, device), repeats))
    worker("reset")
    return row("fp32 GEMM 2048^3 GFLOP/s (best)", peaks["mlx"], peaks["torch"], "GFLOP/s", "MLX", "torch")


def fig_train(worker: Worker, kind: str, size_name: str, cfg: dict, workdir: Path) -> list[dict]:
    """Figure 1: training tokens/s of our compiled step vs the same model in PyTorch (eager, torch.compile).

    GEMM samples are interleaved with the steps, so "% of GEMM peak" compares rates measured under the same load."""
    import mlx.core as mx
    import mlx.optimizers as optim

    import training as T

    size = SIZES[size_name]
    model, loss_fn = mlx_model(kind, size)
    batch_np = make_batches(kind)
    batch = [mx.array(v) for v in batch_np.values()]
    params = T.count_parameters(model)
    initial_loss = loss_fn(model, *batch)[0].item()
    batch_file = workdir / f"{kind}_batch.safetensors"
    mx.save_safetensors(str(batch_file), {k: mx.array(v) for k, v in batch_np.items()})
    setup = worker("setup_train", kind=kind, size=size, weights=save_weights(model, workdir / "w.safetensors"),
                   batch=str(batch_file), batch_keys=list(batch_np), copy=bool(getattr(model.args, "copy", False)),
                   params=params, compile=not cfg["no_torch_compile"], warmup=cfg["warmup"], device=cfg["device"])
    if abs(setup["initial_loss"] - initial_loss) > 1e-3 * max(1.0, abs(initial_loss)):
        raise AssertionError(f"{kind}: torch loss {setup['initial_loss']:.6f} != MLX loss {initial_loss:.6f} "
                             f"with the same weights: bench/torch_models.py no longer matches the MLX model")

    # main.py's CPU step: each batch's rows spread over the cores (cores.py), the encoders packed (the padding
    # skipped), mx.compile'd. Also timed, padded as torch computes it: the same step, the step uncompiled, and
    # uncompiled on one stream (before cores.py; not on a GPU, where there is one stream), on one model.
    import cores

    optimizer = optim.AdamW(learning_rate=1e-3, weight_decay=0.01)
    # Its state made before the steps are traced: the first update would otherwise add the moments, and the
    # compiled steps would trace again inside the first timed sample.
    optimizer.init(model.trainable_parameters())
    steps = {c: T.build_step(model, optimizer, loss_fn, grad_clip=1.0, compile=c) for c in (True, False)}
    packed = packed_batch(kind, batch_np)

    def run(compiled: bool = False, spread: bool = True, pack: bool = False) -> None:
        with cores.spread() if spread else contextlib.nullcontext():
            loss, aux = steps[compiled](*(packed if pack else batch))
            mx.eval(loss, aux, model.state, optimizer.state)

    warm = seconds(partial(run, True, True, True), cfg["warmup"])
    run(True)
    run(False)
    candidates = {"mlx_packed": lambda: seconds(partial(run, True, True, True), cfg["steps"]),
                  "mlx_compiled": lambda: seconds(partial(run, True), cfg["steps"]),
                  "mlx": lambda: seconds(run, cfg["steps"]),
                  "eager": lambda: worker("time", name="eager", steps=cfg["steps"])["s"]}
    if cores.spreads():
        run(False, False)
        candidates["mlx_one_stream"] = lambda: seconds(partial(run, False, False), cfg["steps"])
    if "compiled" in setup["ready"]:
        candidates["compiled"] = lambda: worker("time", name="compiled", steps=cfg["steps"])["s"]
    candidates.update(gemm_candidates(worker, cfg["device"]))
    t = interleaved(candidates, cfg["repeats"])
    peaks = gemm_peaks(t)
    profile = profile_step(kind, model, loss_fn, batch, cfg) if cfg["profile"] and size_name == "small" else None
    worker("reset")

    tokens, flops = batch_tokens(kind), train_flops(kind, **size)
    label = f"{kind} train {size['dim']}d tok/s"
    # Ours is the step as main.py runs it on the CPU: rows over the cores, packed, mx.compile'd (g++ is here). Tokens
    # count every position of the batch, padding included, for both (torch computes them all; we skip the padding).
    streams = f"MLX, {cores.count()} streams"
    ours, ours_name = tokens / t["mlx_packed"]["s"], f"{streams}, packed, mx.compile"
    padded, padded_name = tokens / t["mlx_compiled"]["s"], f"{streams}, padded, mx.compile"
    common = dict(params=params, tokens_per_step=tokens, flops_per_step=flops, initial_loss_mlx=initial_loss,
                  initial_loss_torch=setup["initial_loss"], timings=t, mlx_warmup_s=warm,
                  torch_warmup_s=setup["warmup_s"], streams=cores.count(),
                  real_token_fraction=real_token_fraction(batch_np))
    rows = [row(label, ours, tokens / t["eager"]["s"], "tok/s", ours_name, "torch eager",
                ratio_best=best_ratio(t, "mlx_packed", "eager"), **common)]
    if "compiled" in t:
        rows.append(row(label, ours, tokens / t["compiled"]["s"], "tok/s", ours_name, "torch.compile",
                        ratio_best=best_ratio(t, "mlx_packed", "compiled")))
        rows.append(row(f"{label}, both padded", padded, tokens / t["compiled"]["s"], "tok/s", padded_name,
                        "torch.compile", ratio_best=best_ratio(t, "mlx_compiled", "compiled")))
    else:
        why = setup.get("compile_error", "disabled by --no_torch_compile")
        rows.append(row(label, ours, None, "tok/s", ours_name, f"torch.compile skipped: {why[:80]}"))
    rows.append(row(f"{label}, packed vs padded", ours, padded, "tok/s", ours_name, padded_name,
                    ratio_best=best_ratio(t, "mlx_packed", "mlx_compiled")))
    rows.append(row(f"{label}, mx.compile vs not (padded)", padded, tokens / t["mlx"]["s"], "tok/s",
                    padded_name, streams, ratio_best=best_ratio(t, "mlx_compiled", "mlx")))
    if "mlx_one_stream" in t:
        rows.append(row(f"{label}, streams vs one (padded)", tokens / t["mlx"]["s"],
                        tokens / t["mlx_one_stream"]["s"], "tok/s", streams, "MLX, one stream",
                        ratio_best=best_ratio(t, "mlx", "mlx_one_stream")))
    # One peak for both: the faster of the two GEMMs is what this machine can do.
    best_ref, peak = ("compiled" if "compiled" in t else "eager"), max(peaks.values())
    # FLOPs of the padded batch over the padded step's time, for both: the share of the peak each turns into work.
    rows.append(row(f"{kind} train {size['dim']}d % of the machine's GEMM peak",
                    100 * flops / t["mlx_compiled"]["s"] / 1e9 / peak, 100 * flops / t[best_ref]["s"] / 1e9 / peak,
                    "%", padded_name, f"torch {best_ref}", gemm_gflops=peaks))
    if profile:
        rows[0]["profile"] = profile
    return rows


def profile_step(kind: str, model, loss_fn, batch, cfg: dict) -> dict:
    """Where the MLX step's time goes: forward, forward+backward, and (generator) encoder, decoder, and the
    output projection with and without the copy head, each alone."""
    import mlx.core as mx
    import mlx.nn as nn

    def median(fn):
        fn()  # warm-up (compilation)
        return statistics.median(seconds(fn) for _ in range(cfg["repeats"]))

    fwd = mx.compile(lambda *b: loss_fn(model, *b)[0])
    grad = nn.value_and_grad(model, lambda m, *b: loss_fn(m, *b)[0])
    out = {
        "forward_eager_s": median(lambda: mx.eval(loss_fn(model, *batch))),
        "forward_compiled_s": median(lambda: mx.eval(fwd(*batch))),
        "forward_backward_eager_s": median(lambda: mx.eval(grad(model, *batch))),
    }
    if kind != "generator":
        return out
    passages, answer_in, answer_out = batch
    out["encoder_forward_s"] = median(lambda: mx.eval(model.encode(passages)))
    memory = model.encode(passages)
    mx.eval(memory)
    mask = answer_out != 0

    def nll(logp):
        picked = mx.take_along_axis(logp, answer_out[..., None], axis=-1).squeeze(-1)
        return -(picked * mask).sum() / mask.sum()

    dec = nn.value_and_grad(model, lambda m: nll(m.decode(answer_in, memory)))
    out["decoder_fwd_bwd_s"] = median(lambda: mx.eval(dec(model)))
    # The tied output projection + log-softmax alone, then with a copy distribution scattered onto the vocabulary
    # the way generator.decode does it (forward + backward, random inputs of the real shapes).
    h = mx.random.normal((BATCH, ANSWER_LEN, model.args.dim))
    S = passages.shape[1] * passages.shape[2]
    attn = mx.softmax(mx.random.normal((BATCH, ANSWER_LEN, S)), axis=-1)
    ids = mx.broadcast_to(passages.reshape(BATCH, 1, S), attn.shape)
    b = mx.broadcast_to(mx.arange(BATCH)[:, None, None], attn.shape)
    t = mx.broadcast_to(mx.arange(ANSWER_LEN)[None, :, None], attn.shape)

    def vocab_head(h, w, attn):
        return nll(nn.log_softmax(h @ w.T, axis=-1))

    def copy_head(h, w, attn):
        copy = mx.zeros((BATCH, ANSWER_LEN, w.shape[0])).at[b, t, ids].add(attn)
        return nll(mx.log(0.5 * mx.softmax(h @ w.T, axis=-1) + 0.5 * copy + 1e-9))

    for name, fn in (("output_proj_logsoftmax_fwd_bwd_s", vocab_head), ("output_proj_copy_fwd_bwd_s", copy_head)):
        g = mx.value_and_grad(fn, argnums=(0, 1, 2))
        out[name] = median(lambda g=g: mx.eval(g(h, model.embed.weight, attn)))
    return out


def fig_search(worker: Worker, n: int, cfg: dict, workdir: Path) -> dict:
    """Figure 2: exact top-20 inner-product search, index.search vs faiss IndexFlatIP (on a GPU: torch's matmul and
    topk on the same GPU); same ids up to ties."""
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
    got = {}

    def run():
        got["ids"] = index.search(q, e, 20)[1]

    run()
    ids_file = str(workdir / "reference_ids.safetensors")
    worker("setup_search", data=str(path), k=20, ids_file=ids_file, device=cfg["device"])
    t = interleaved({"mlx": lambda: seconds(run), "reference": lambda: worker("time", name="search")["s"]},
                    cfg["repeats"])
    worker("reset")
    reference = "faiss IndexFlatIP" if cfg["device"] == "cpu" else f"torch matmul + topk ({cfg['device']})"
    ids_ref = np.array(mx.load(ids_file)["ids"]).astype(np.int64)
    # Equal up to ties: the exact (float64) scores of both top-20 lists must agree rank by rank.
    q64, e64 = queries.astype(np.float64), emb.astype(np.float64)

    def exact(ids):
        return np.sort(np.einsum("qd,qkd->qk", q64, e64[ids]), axis=1)

    if not np.allclose(exact(got["ids"]), exact(ids_ref), atol=1e-5):
        raise AssertionError(f"search over {n:,}: MLX and {reference} top-20 differ beyond ties")
    same = float(np.mean([set(a) == set(b) for a, b in zip(got["ids"], ids_ref, strict=True)]))
    return row(f"top-20 search {n // 1000}k x 64d, 1000 queries, q/s", 1000 / t["mlx"]["s"],
               1000 / t["reference"]["s"], "q/s", "index.search", reference,
               ratio_best=best_ratio(t, "mlx", "reference"), rows_with_identical_id_sets=same, timings=t)


def fig_decode(cfg: dict, size: str = "small") -> list[dict]:
    """Figure 3: greedy decoding tokens/s with the KV cache vs re-running the decoder on the whole prefix; each
    pair timed end to end (both encode the passages, as `generate` does) and for the decoding steps alone (both
    given the same encoded passages), with the generator of `size`."""
    import mlx.core as mx

    model, _ = mlx_model("generator", SIZES[size])
    dim = SIZES[size]["dim"]
    passages_np = make_batches("generator")["passages"]
    rows = []
    for batch_size in (1, BATCH):
        passages = mx.array(passages_np[:batch_size])
        memory = model.encode_spread(passages)  # what `generate` computes first
        got: dict = {}

        def cached(n: int, memory=None, p=passages, got=got) -> None:
            got["cached", memory is None] = mx.stack(list(model.generate(p, max_tokens=n, memory=memory)), axis=1)

        def recompute(n: int, memory=None, p=passages, got=got) -> None:
            got["recompute", memory is None] = model.generate_recompute(p, n, memory=memory)

        def agreement(encoding: bool, got=got) -> float:  # the tokens both paths chose, in their last samples
            same = mx.array(got["recompute", encoding]) == got["cached", encoding]
            return same.astype(mx.float32).mean().item()

        cached(2)  # warm-up
        recompute(2)
        encode = statistics.median(seconds(lambda p=passages: model.encode_spread(p)) for _ in range(cfg["repeats"]))
        for length in (16, 64):
            t = interleaved({"cached": partial(seconds, partial(cached, length)),
                             "recompute": partial(seconds, partial(recompute, length)),
                             "cached_decoding": partial(seconds, partial(cached, length, memory)),
                             "recompute_decoding": partial(seconds, partial(recompute, length, memory))},
                            cfg["repeats"])
            n = batch_size * length
            rows.append(row(f"decode dim {dim}, B={batch_size}, {length} tokens, tok/s", n / t["cached"]["s"],
                            n / t["recompute"]["s"], "tok/s", "generate (KV cache)", "generate_recompute",
                            ratio_best=best_ratio(t, "cached", "recompute"), token_agreement=agreement(True),
                            encode_s=encode, timings=t))
            rows.append(row(f"decode dim {dim}, B={batch_size}, {length} tokens, decoding steps only, tok/s",
                            n / t["cached_decoding"]["s"], n / t["recompute_decoding"]["s"], "tok/s",
                            "generate (KV cache), passages encoded", "generate_recompute, passages encoded",
                            ratio_best=best_ratio(t, "cached_decoding", "recompute_decoding"),
                            token_agreement=agreement(False)))
    return rows


def fig_embed(worker: Worker, cfg: dict, workdir: Path) -> dict:
    """Figure 4: chunk-embedding throughput of index.embed (retriever dim 256) vs the same model in torch."""
    import mlx.core as mx

    import cores
    import index

    model, _ = mlx_model("retriever", SIZES["small"])
    n = cfg["embed_chunks"]
    chunks = embed_chunks(n)
    mx.eval(index.embed(model, chunks[:256]))

    def padded() -> None:  # the same batches without packing: every position computed, as torch does
        for i in range(0, n, 256):
            with cores.spread():
                mx.eval(model(mx.array(chunks[i : i + 256])))

    worker("setup_embed", weights=save_weights(model, workdir / "w.safetensors"), size=SIZES["small"], chunks=n,
           device=cfg["device"])
    t = interleaved({"mlx": lambda: seconds(lambda: mx.eval(index.embed(model, chunks))),
                     "mlx_padded": lambda: seconds(padded),
                     "torch": lambda: worker("time", name="embed")["s"]}, cfg["repeats"])
    worker("reset")
    real = float((chunks != 0).mean())
    return row(f"embed {n} chunks of {CONTEXT} tokens, dim 256, chunks/s", n / t["mlx"]["s"], n / t["torch"]["s"],
               "chunks/s", "index.embed (packed)", "torch eager, inference_mode",
               ratio_best=best_ratio(t, "mlx", "torch"), real_token_fraction=real,
               padded_chunks_per_s=n / t["mlx_padded"]["s"], padded_ratio=t["torch"]["s"] / t["mlx_padded"]["s"],
               timings=t)


# Runs argv as its child and prints the child's own peak RSS. A process's peak RSS starts at its parent's RSS at the
# fork (and Python's vfork-based spawn carries it over the exec), so the launcher must itself be a fresh, small one.
PEAK_RSS_LAUNCHER = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
print(f"peak_rss_kib {usage.ru_maxrss}", flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def stage_seconds(log: str) -> dict[str, float]:
    """The stages' wall seconds from the line `main.py` ends with: "done in 298s (dataset 1.9s, ...)"."""
    line = log.strip().splitlines()[-2]  # the launcher's peak_rss_kib line comes last
    total, stages = re.fullmatch(r"done in (\d+)s \((.*)\)", line).groups()
    return {name: float(t.removesuffix("s")) for name, t in (stage.split() for stage in stages.split(", "))}


def fig_main(workdir: Path, extra: list[str]) -> list[dict]:
    """Figure 5: the README's main command, `main.py --target all` in an empty --save_dir with default flags plus
    `extra`: its wall time (process start-up and the fast-BLAS re-exec included) and peak RSS, and each stage's
    wall time from the line it ends with."""
    log = workdir / "main_all.log"
    cmd = [sys.executable, str(ROOT / "main.py"), "--target", "all", "--save_dir", str(workdir / "main_run"), *extra]
    tic = time.perf_counter()
    with open(log, "w") as f:
        # Through a small launcher: a child's peak RSS counts its parent's at the fork, and ours is large.
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS_LAUNCHER, *cmd], stdout=f, stderr=subprocess.STDOUT,
                              env=worker_env(), cwd=ROOT)
    wall = time.perf_counter() - tic
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"main.py --target all exited {proc.returncode}:\n{text[-1500:]}")
    peak_kib = int(text.rsplit("peak_rss_kib ", 1)[1].split()[0])
    command = " ".join(["python", "main.py", "--target", "all", *extra])
    rows = [row("main.py --target all, empty --save_dir, wall s", wall, None, "s", "main.py", "-", command=command,
                peak_rss_mib=peak_kib / 1024, log_tail=text[-6000:])]
    for stage, seconds in stage_seconds(text).items():
        rows.append(row(f"  its {stage} stage, wall s", seconds, None, "s", "main.py", "-"))
    return rows
