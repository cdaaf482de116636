"""Benchmark suite: our MLX models and search against PyTorch / faiss references, measured in one run.

    python bench/run.py [--quick] [--skip_main] [--profile]

Prints one table and writes bench/results.json. MLX runs in this process, re-executed with a fast BLAS exactly as
main.py does. PyTorch and faiss run in one subprocess (bench/torch_worker.py) started with the user's own
environment (no BLAS preload), so neither framework's threads disturb the other's timings. The two sides' timings
are interleaved (one MLX sample, one reference sample, repeat) so that load from other processes hits both
alike; each figure is the median of the samples. Arrays travel between the processes through safetensors
files, commands as JSON lines.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB, CONTEXT, BATCH, QLEN, K_PASSAGES, ANSWER_LEN = 10_000, 64, 32, 16, 5, 16
SIZES = {"small": dict(dim=256, num_blocks=4, num_heads=4), "large": dict(dim=1024, num_blocks=4, num_heads=8)}


# ----------------------------------------------------------------------------------------------- shared helpers


def seconds(fn: Callable[[], object], steps: int = 1) -> float:
    """Seconds per call of `fn` (which must block until its work is done), over `steps` calls."""
    tic = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - tic) / steps


def make_batches(kind: str, seed: int = 0) -> dict:
    """Synthetic numpy batches of the benchmark shapes, with PAD tails as real batches have."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def rows(n, width, min_len):
        t = rng.integers(4, VOCAB, size=(n, width), dtype=np.int32)
        t[np.arange(width)[None, :] >= rng.integers(min_len, width + 1, size=n)[:, None]] = 0
        return t

    if kind == "retriever":
        mask = np.eye(BATCH, 2 * BATCH, dtype=bool) | (rng.random((BATCH, 2 * BATCH)) < 0.02)
        return {"questions": rows(BATCH, QLEN, 6), "chunks": rows(2 * BATCH, CONTEXT, 40), "positive_mask": mask}
    q = rows(BATCH, QLEN, 6)
    c = rows(BATCH * K_PASSAGES, CONTEXT, 40).reshape(BATCH, K_PASSAGES, CONTEXT)
    sep = np.full((BATCH, K_PASSAGES, 1), 3, dtype=np.int32)  # EOS between question and chunk
    passages = np.concatenate([np.broadcast_to(q[:, None], (BATCH, K_PASSAGES, QLEN)), sep, c], axis=2)
    answers = rows(BATCH, ANSWER_LEN, 2)
    answer_in = np.concatenate([np.full((BATCH, 1), 2, np.int32), answers[:, :-1]], axis=1)  # BOS + answer
    return {"passages": np.ascontiguousarray(passages), "answer_in": answer_in, "answer_out": answers}


def embed_chunks(n: int):
    chunks = make_batches("retriever")["chunks"]
    return chunks[[i % len(chunks) for i in range(n)]]


def batch_tokens(kind: str) -> int:
    """Positions processed per training step, padding included (the compute is dense)."""
    if kind == "retriever":
        return BATCH * QLEN + 2 * BATCH * CONTEXT
    return BATCH * K_PASSAGES * (QLEN + 1 + CONTEXT) + BATCH * ANSWER_LEN


def train_flops(kind: str, dim: int, num_blocks: int, num_heads: int) -> float:
    """Matmul FLOPs of one training step (3 x forward) as both frameworks compute it: 6 x weights per token for the
    position-wise layers, plus attention, the cross-attention and copy pointer with the memory's projections folded
    in (no product per memory position with their weights), and the tied output projection."""

    def encoder(n_seqs, L):
        return n_seqs * num_blocks * (24 * L * dim * dim + 4 * L * L * dim)

    if kind == "retriever":
        return 3.0 * (encoder(BATCH, QLEN) + encoder(2 * BATCH, CONTEXT) + 2 * 3 * BATCH * dim * 128)
    Lp, T = QLEN + 1 + CONTEXT, ANSWER_LEN
    S = K_PASSAGES * Lp
    # Decoder block: self-attn 8TD^2 and its scores 4T^2D, MLP 16TD^2; the cross-attention as both sides compute it,
    # with the memory's key/value projections folded in (layers.CrossAttention): q/out 4TD^2, the fold into the
    # queries and out of the read memory 4TD^2, scores and reads over the memory for each head 4HTSD. The pointer:
    # q 2TD^2, its key projection folded in 2TD^2, scores 2TSD.
    per_block = 32 * T * dim * dim + 4 * T * T * dim + 4 * num_heads * T * S * dim
    pointer = 4 * T * dim * dim + 2 * T * S * dim
    fwd = encoder(BATCH * K_PASSAGES, Lp) + BATCH * (num_blocks * per_block + 2 * T * dim * VOCAB + pointer)
    return 3.0 * fwd


def worker_env() -> dict:
    """This process's environment minus the BLAS preload fastpath added, i.e. what the user started us with."""
    env = dict(os.environ)
    ours = env.pop("RAGMLX_PRELOADED", "")
    env.pop("RAGMLX_BLAS_PREFIX", None)
    if env.pop("RAGMLX_REEXEC", None) == "1" and ours:
        rest = env.get("LD_PRELOAD", "").removeprefix(ours).lstrip(":")
        if rest:
            env["LD_PRELOAD"] = rest
        else:
            env.pop("LD_PRELOAD", None)
    return env


class Worker:
    """The PyTorch/faiss side: one long-lived `bench/torch_worker.py` process answering JSON-line commands."""

    def __init__(self, log_path: Path):
        self.log = open(log_path, "w")
        self.log_path = log_path
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "torch_worker.py")]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=worker_env())

    def __call__(self, task: str, **spec) -> dict:
        self.proc.stdin.write(json.dumps({"task": task, **spec}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            raise RuntimeError(f"bench worker died during {task}: {self.log_path.read_text()[-2000:]}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"bench worker {task}: {reply['error']}")
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


def interleaved(candidates: dict[str, Callable[[], float]], repeats: int) -> dict[str, dict]:
    """Take `repeats` samples of every candidate in turn (A, B, C, A, B, C...); median seconds per candidate."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, sample in candidates.items():
            samples[name].append(sample())
    return {name: {"s": statistics.median(s), "best": min(s), "samples": s} for name, s in samples.items()}


def best_ratio(t: dict, ours: str, reference: str) -> float:
    """Speed ratio of the fastest samples: less sensitive than the medians to other processes' load."""
    return t[reference]["best"] / t[ours]["best"]


def row(figure: str, ours: float, reference: float | None, unit: str, ours_name: str, reference_name: str,
        **details) -> dict:
    ratio = ours / reference if reference else None
    return {"figure": figure, "ours": ours, "reference": reference, "ratio": ratio, "unit": unit,
            "ours_name": ours_name, "reference_name": reference_name, **details}


# ----------------------------------------------------------------------------------------------- MLX side


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


def gemm_candidates(worker: Worker, n: int = 2048) -> dict[str, Callable[[], float]]:
    """One n x n x n fp32 matmul in MLX and one in torch, as `interleaved` candidates."""
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    worker("setup_gemm", n=n)
    # Each sample is the best of 3 matmuls, so that a single sample per repeat still finds the peak.
    return {"gemm_mlx": lambda: min(seconds(lambda: mx.eval(a @ b)) for _ in range(3)),
            "gemm_torch": lambda: worker("time", name="gemm", best_of=3)["s"]}


def gemm_peaks(t: dict, n: int = 2048) -> dict[str, float]:
    """GFLOP/s of the fastest GEMM sample of each framework."""
    return {k: 2 * n**3 / t[f"gemm_{k}"]["best"] / 1e9 for k in ("mlx", "torch")}


def fig_gemm(worker: Worker, repeats: int) -> dict:
    """Peak fp32 GEMM: a 2048^3 matmul in MLX and in torch (best of 3 x `repeats`)."""
    peaks = gemm_peaks(interleaved(gemm_candidates(worker), repeats))
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
                   params=params, compile=not cfg["no_torch_compile"], warmup=cfg["warmup"])
    if abs(setup["initial_loss"] - initial_loss) > 1e-3 * max(1.0, abs(initial_loss)):
        raise AssertionError(f"{kind}: torch loss {setup['initial_loss']:.6f} != MLX loss {initial_loss:.6f} "
                             f"with the same weights: bench/torch_models.py no longer matches the MLX model")

    # main.py's CPU step: each batch's rows spread over the cores (cores.py), the encoders packed (the padding
    # skipped), mx.compile'd. Also timed, padded as torch computes it: the same step, the step uncompiled, and
    # uncompiled on one stream (before cores.py), on one model.
    import cores

    optimizer = optim.AdamW(learning_rate=1e-3, weight_decay=0.01)
    steps = {c: T.build_step(model, optimizer, loss_fn, grad_clip=1.0, compile=c) for c in (True, False)}
    packed = packed_batch(kind, batch_np)

    def run(compiled: bool = False, spread: bool = True, pack: bool = False) -> None:
        with cores.spread() if spread else contextlib.nullcontext():
            loss, aux = steps[compiled](*(packed if pack else batch))
            mx.eval(loss, aux, model.state, optimizer.state)

    warm = seconds(partial(run, True, True, True), cfg["warmup"])
    run(True)
    run(False)
    run(False, False)
    candidates = {"mlx_packed": lambda: seconds(partial(run, True, True, True), cfg["steps"]),
                  "mlx_compiled": lambda: seconds(partial(run, True), cfg["steps"]),
                  "mlx": lambda: seconds(run, cfg["steps"]),
                  "mlx_one_stream": lambda: seconds(partial(run, False, False), cfg["steps"]),
                  "eager": lambda: worker("time", name="eager", steps=cfg["steps"])["s"]}
    if "compiled" in setup["ready"]:
        candidates["compiled"] = lambda: worker("time", name="compiled", steps=cfg["steps"])["s"]
    candidates.update(gemm_candidates(worker))
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


def real_token_fraction(batch_np: dict) -> float:
    """The share of the batch's encoder positions that are not padding (what a packed step computes)."""
    rows = [v for k, v in batch_np.items() if k in ("questions", "chunks", "passages")]
    return sum(int((r != 0).sum()) for r in rows) / sum(r.size for r in rows)


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
    got = {}

    def run():
        got["ids"] = index.search(q, e, 20)[1]

    run()
    ids_file = str(workdir / "faiss_ids.safetensors")
    worker("setup_search", data=str(path), k=20, ids_file=ids_file)
    t = interleaved({"mlx": lambda: seconds(run), "faiss": lambda: worker("time", name="search")["s"]},
                    cfg["repeats"])
    worker("reset")
    ids_faiss = np.array(mx.load(ids_file)["ids"]).astype(np.int64)
    # Equal up to ties: the exact (float64) scores of both top-20 lists must agree rank by rank.
    q64, e64 = queries.astype(np.float64), emb.astype(np.float64)

    def exact(ids):
        return np.sort(np.einsum("qd,qkd->qk", q64, e64[ids]), axis=1)

    if not np.allclose(exact(got["ids"]), exact(ids_faiss), atol=1e-5):
        raise AssertionError(f"search over {n:,}: MLX and faiss top-20 differ beyond ties")
    same = float(np.mean([set(a) == set(b) for a, b in zip(got["ids"], ids_faiss, strict=True)]))
    return row(f"top-20 search {n // 1000}k x 64d, 1000 queries, q/s", 1000 / t["mlx"]["s"], 1000 / t["faiss"]["s"],
               "q/s", "index.search", "faiss IndexFlatIP", ratio_best=best_ratio(t, "mlx", "faiss"),
               rows_with_identical_id_sets=same, timings=t)


def fig_decode(cfg: dict) -> list[dict]:
    """Figure 3: greedy decoding tokens/s with the KV cache vs re-running the decoder on the whole prefix; each
    pair timed end to end (both encode the passages, as `generate` does) and for the decoding steps alone (both
    given the same encoded passages)."""
    import mlx.core as mx

    model, _ = mlx_model("generator", SIZES["small"])
    passages_np = make_batches("generator")["passages"]
    rows = []
    for batch_size in (1, BATCH):
        passages = mx.array(passages_np[:batch_size])
        memory = model.encode_spread(passages)  # what `generate` computes first
        got: dict = {}

        def cached(n: int, memory=None, p=passages, got=got) -> None:
            got["cached"] = mx.stack(list(model.generate(p, max_tokens=n, memory=memory)), axis=1)

        def recompute(n: int, memory=None, p=passages, got=got) -> None:
            got["recompute"] = model.generate_recompute(p, n, memory=memory)

        cached(2)  # warm-up
        recompute(2)
        encode = statistics.median(seconds(lambda p=passages: model.encode_spread(p)) for _ in range(cfg["repeats"]))
        for length in (16, 64):
            t = interleaved({"cached": partial(seconds, partial(cached, length)),
                             "recompute": partial(seconds, partial(recompute, length)),
                             "cached_decoding": partial(seconds, partial(cached, length, memory)),
                             "recompute_decoding": partial(seconds, partial(recompute, length, memory))},
                            cfg["repeats"])
            agree = (mx.array(got["recompute"]) == got["cached"]).astype(mx.float32).mean().item()
            n = batch_size * length
            rows.append(row(f"decode dim 256, B={batch_size}, {length} tokens, tok/s", n / t["cached"]["s"],
                            n / t["recompute"]["s"], "tok/s", "generate (KV cache)", "generate_recompute",
                            ratio_best=best_ratio(t, "cached", "recompute"), token_agreement=agree, encode_s=encode,
                            timings=t))
            rows.append(row(f"decode dim 256, B={batch_size}, {length} tokens, decoding steps only, tok/s",
                            n / t["cached_decoding"]["s"], n / t["recompute_decoding"]["s"], "tok/s",
                            "generate (KV cache), passages encoded", "generate_recompute, passages encoded",
                            ratio_best=best_ratio(t, "cached_decoding", "recompute_decoding")))
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

    worker("setup_embed", weights=save_weights(model, workdir / "w.safetensors"), size=SIZES["small"], chunks=n)
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


def fig_main(workdir: Path, extra: list[str]) -> list[dict]:
    """Figure 5: wall time and peak RSS of `main.py --target dataset`, `retriever`, `all`, run one after another
    in one --save_dir (each reuses what the previous one built), with default flags plus `extra`."""
    save_dir = workdir / "main_run"
    rows = []
    for target in ("dataset", "retriever", "all"):
        log = workdir / f"main_{target}.log"
        cmd = [sys.executable, str(ROOT / "main.py"), "--target", target, "--save_dir", str(save_dir), *extra]
        tic = time.perf_counter()
        with open(log, "w") as f:
            # Through a small launcher: a child's peak RSS counts its parent's at the fork, and ours is large.
            proc = subprocess.run([sys.executable, "-c", PEAK_RSS_LAUNCHER, *cmd], stdout=f, stderr=subprocess.STDOUT,
                                  env=worker_env(), cwd=ROOT)
        wall = time.perf_counter() - tic
        text = log.read_text()
        if proc.returncode != 0:
            raise RuntimeError(f"main.py --target {target} exited {proc.returncode}:\n{text[-1500:]}")
        peak_kib = int(text.rsplit("peak_rss_kib ", 1)[1].split()[0])
        rows.append(row(f"main.py --target {target} (after the previous), wall s", wall, None, "s", "main.py", "-",
                        command=" ".join(["python", "main.py", *cmd[2:]]), peak_rss_mib=peak_kib / 1024,
                        log_tail=text[-4000:]))
    return rows


# ----------------------------------------------------------------------------------------------- report


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


def set_threads(argv: list[str]) -> None:
    """Apply --threads through the environment, before any BLAS or OpenMP runtime is loaded (or re-executed)."""
    threads = build_parser().parse_known_args(argv)[0].threads
    if threads is not None and threads > 0:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark our MLX models, search and pipeline against references.")
    p.add_argument("--quick", action="store_true",
                   help="same as --sizes small, and 512 chunks to embed instead of 2048")
    p.add_argument("--sizes", default="small,large",
                   help="small: dim 256 models and 100k search; large: dim 1024 models and 1M search")
    p.add_argument("--skip_main", action="store_true", help="skip timing `main.py --target all` (many minutes)")
    p.add_argument("--profile", action="store_true", help="also break the dim-256 MLX training steps down")
    p.add_argument("--main_args", default="", help="extra flags for the main.py runs, e.g. \"--num_iters 100\"")
    p.add_argument("--no_torch_compile", action="store_true", help="skip the torch.compile reference")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for both frameworks (OMP/OPENBLAS/MKL_NUM_THREADS, set before MLX's BLAS or torch "
                        "load); default: each library's own (all cores)")
    p.add_argument("--repeats", type=int, default=3, help="timed samples per measurement (the median is kept)")
    p.add_argument("--only", default="train,search,decode,embed,main",
                   help="comma-separated figures to run: train,search,decode,embed,main")
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
               "--repeats must be positive" if args.repeats <= 0 else None)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.skip_main:
        figures.discard("main")
    import mlx.core as mx
    import numpy as np

    import cores
    import fastpath

    mx.set_default_device(mx.cpu)
    fastpath.keep_freed_memory()  # as main.py sets up the CPU
    cores.configure(0)
    cfg = {"warmup": 1, "steps": 1, "repeats": args.repeats, "no_torch_compile": args.no_torch_compile,
           "embed_chunks": 512 if args.quick else 2048, "profile": args.profile}
    load_start, started = os.getloadavg(), time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ragmlx-bench-") as tmp:
        workdir = Path(tmp)
        worker = Worker(workdir / "worker.log")
        try:
            info = worker("info")
            rows.append(fig_gemm(worker, max(args.repeats, 5)))
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
                steps.append(lambda: fig_decode(cfg))
            if "embed" in figures:
                steps.append(lambda: [fig_embed(worker, cfg, workdir)])
            if "main" in figures:
                steps.append(lambda: fig_main(workdir, shlex.split(args.main_args)))
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
    print(f"\n{results['date']}  {m['cpu']}, {m['cores']} cores  MLX BLAS: {results['blas']}  "
          f"load {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    print(table(rows))
    print(f"wrote {args.out} ({results['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    import fastpath
    import cores

    cores.widen_graph_order()  # as main.py: before MLX evaluates anything; inherited by the re-exec
    set_threads(sys.argv[1:])
    line = fastpath.ensure_fast_blas(sys.argv)  # may re-exec this process with a fast BLAS preloaded
    print(line, flush=True)
    sys.exit(main(sys.argv[1:], line))
