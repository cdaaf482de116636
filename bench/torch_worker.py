"""The reference side of bench/run.py: PyTorch and faiss in their own process, driven by JSON lines on stdin.

bench/run.py starts this once with the user's own environment (no BLAS preload), sends one command per line
("setup_train", "time", ...) and reads one JSON reply per line; arrays arrive as safetensors files. Timing code
and sizes are bench/workload.py's, so both sides measure alike. Each setup names its torch device ("cpu", "cuda"
or "mps"); a GPU's callables wait for the device before they return, so `time` measures finished work. On a GPU
the search reference is torch's own exact search (a matmul and `topk`), faiss's flat index being the CPU's.
"""

from __future__ import annotations

import json
import os
import sys

from workload import VOCAB, embed_chunks, seconds


def worker_loop() -> None:
    """The reference side: read JSON commands on stdin, answer one JSON line each on the real stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the replies
    state: dict = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            reply = worker_task(cmd.pop("task"), cmd, state)
        except Exception as e:  # report to the parent, which raises with the message
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply, default=float) + "\n")
        out.flush()


def worker_task(task: str, spec: dict, state: dict) -> dict:
    """Set up a reference measurement (registering callables in `state`) or time one of them."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    if task == "time":
        return {"s": min(seconds(state[spec["name"]], spec.get("steps", 1)) for _ in range(spec.get("best_of", 1)))}
    if task == "reset":
        state.clear()
        return {}
    if task == "info":
        return device_info(spec.get("device", "cpu"))

    import torch

    device = torch.device(spec.get("device", "cpu"))
    if task == "setup_gemm":
        a, b = (torch.randn(spec["n"], spec["n"], device=device) for _ in range(2))
        state["gemm"] = synced(lambda: a @ b, device)
        state["gemm"]()
        return {}
    if task == "setup_search":
        data = load_file(spec["data"])
        if device.type == "cpu":
            import faiss

            flat = faiss.IndexFlatIP(data["index"].shape[1])
            flat.add(data["index"])
            state["search"] = lambda: flat.search(data["queries"], spec["k"])[1]
        else:
            index, queries = (torch.from_numpy(data[k]).to(device) for k in ("index", "queries"))
            state["search"] = synced(lambda: torch.topk(queries @ index.T, spec["k"], dim=1).indices, device)
        save_file({"ids": np.asarray(torch.as_tensor(state["search"]()).cpu(), dtype=np.int64)}, spec["ids_file"])
        return {}

    import torch_models as TM

    size, flat = spec["size"], load_file(spec["weights"])
    if task == "setup_embed":
        model = TM.Retriever(VOCAB, **size)
        TM.load_flat(model, flat)
        model.to(device)
        chunks = torch.from_numpy(embed_chunks(spec["chunks"])).long().to(device)

        def embed():
            with torch.inference_mode():
                return [model(chunks[i : i + 256]) for i in range(0, len(chunks), 256)]

        state["embed"] = synced(embed, device)
        state["embed"]()
        return {}

    assert task == "setup_train", task
    arrays = load_file(spec["batch"])
    batch = [torch.from_numpy(arrays[k]) for k in spec["batch_keys"]]
    batch = [(b if b.dtype == torch.bool else b.long()).to(device) for b in batch]
    loss_fn = TM.contrastive_loss if spec["kind"] == "retriever" else TM.seq2seq_loss

    def fresh():
        if spec["kind"] == "retriever":
            m = TM.Retriever(VOCAB, **size)
        else:
            m = TM.Generator(VOCAB, size["dim"], size["num_blocks"], size["num_blocks"], size["num_heads"],
                             copy=spec["copy"])
        TM.load_flat(m, flat)
        if TM.count_parameters(m) != spec["params"]:
            raise AssertionError(f"torch has {TM.count_parameters(m):,} parameters, MLX {spec['params']:,}")
        return m.to(device)

    def make_step(m, loss):
        # fused: torch's fastest AdamW on the CPU (the default per-tensor loop took ~20 ms of a retriever step)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01, fused=True)

        def step():
            opt.zero_grad(set_to_none=True)
            loss(*batch)[0].backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()

        return synced(step, device)

    eager = fresh()
    with torch.no_grad():
        reply = {"initial_loss": loss_fn(eager, *batch)[0].item(), "ready": ["eager"], "warmup_s": {}}
    state["eager"] = make_step(eager, lambda *b: loss_fn(eager, *b))
    reply["warmup_s"]["eager"] = seconds(state["eager"], spec["warmup"])
    if spec["compile"]:
        compiled = fresh()
        try:
            state["compiled"] = make_step(compiled, torch.compile(lambda *b: loss_fn(compiled, *b)))
            reply["warmup_s"]["compiled"] = seconds(state["compiled"], max(spec["warmup"], 2))
            reply["ready"].append("compiled")
        except Exception as e:  # inductor needs a working C++ toolchain; report why it was skipped
            state.pop("compiled", None)
            reply["compile_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    return reply


def synced(fn, device):
    """`fn` that returns only once the device has finished its work (a GPU runs it asynchronously)."""
    import torch

    if device.type == "cpu":
        return fn
    wait = torch.cuda.synchronize if device.type == "cuda" else torch.mps.synchronize

    def call():
        out = fn()
        wait()
        return out

    return call


def device_info(device: str) -> dict:
    """Versions, threads, BLAS, and the GPU's name and fp32 matmul precision for a GPU `device`; an error when
    torch cannot use it. faiss is only the CPU's reference: None where it is not installed."""
    import torch

    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    info = {"torch": torch.__version__, "faiss": faiss_version, "threads": torch.get_num_threads(),
            "torch_blas": [s.strip() for s in torch.__config__.show().splitlines() if "Math Kernel" in s
                           or "OpenBLAS" in s or "MKL-DNN" in s]}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    elif device == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("torch sees no MPS device")
    info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return info


if __name__ == "__main__":
    from workload import ROOT

    sys.path.append(str(ROOT))  # appended: none of the project's modules may shadow a library torch imports
    import fastpath

    # The allocator settings bench/run.py gives MLX's process (as main.py does): without them every torch step
    # faults its freed buffers back in, tens of thousands of page faults a step that MLX's step does not pay.
    fastpath.keep_freed_memory()
    # --tf32 (GPU): fp32 matmuls in TF32, as MLX's CUDA backend does by default; else full fp32 on both sides.
    if os.environ.get("RAGMLX_BENCH_TF32") == "1":
        import torch

        torch.set_float32_matmul_precision("high")
    worker_loop()
