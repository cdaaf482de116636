"""The reference side of bench/run.py: PyTorch and faiss in their own process, driven by JSON lines on stdin.

bench/run.py starts this once with the user's own environment (no BLAS preload), sends one command per line
("setup_train", "time", ...) and reads one JSON reply per line; arrays arrive as safetensors files. Timing code
and sizes are bench/workload.py's, so both sides measure alike.
"""

from __future__ import annotations

import json
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
        import faiss
        import torch

        return {"torch": torch.__version__, "faiss": faiss.__version__, "threads": torch.get_num_threads(),
                "torch_blas": [s.strip() for s in torch.__config__.show().splitlines() if "Math Kernel" in s
                               or "OpenBLAS" in s or "MKL-DNN" in s]}
    if task == "setup_gemm":
        import torch

        a, b = torch.randn(spec["n"], spec["n"]), torch.randn(spec["n"], spec["n"])
        state["gemm"] = lambda: a @ b
        state["gemm"]()
        return {}
    if task == "setup_search":
        import faiss

        data = load_file(spec["data"])
        flat = faiss.IndexFlatIP(data["index"].shape[1])
        flat.add(data["index"])
        state["search"] = lambda: flat.search(data["queries"], spec["k"])
        save_file({"ids": state["search"]()[1].astype(np.int64)}, spec["ids_file"])
        return {}

    import torch
    import torch_models as TM

    size, flat = spec["size"], load_file(spec["weights"])
    if task == "setup_embed":
        model = TM.Retriever(VOCAB, **size)
        TM.load_flat(model, flat)
        chunks = torch.from_numpy(embed_chunks(spec["chunks"])).long()

        def embed():
            with torch.inference_mode():
                return [model(chunks[i : i + 256]) for i in range(0, len(chunks), 256)]

        state["embed"] = embed
        embed()
        return {}

    assert task == "setup_train", task
    arrays = load_file(spec["batch"])
    batch = [torch.from_numpy(arrays[k]) for k in spec["batch_keys"]]
    batch = [b if b.dtype == torch.bool else b.long() for b in batch]
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
        return m

    def make_step(m, loss):
        # fused: torch's fastest AdamW on the CPU (the default per-tensor loop took ~20 ms of a retriever step)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01, fused=True)

        def step():
            opt.zero_grad(set_to_none=True)
            loss(*batch)[0].backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()

        return step

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


if __name__ == "__main__":
    from workload import ROOT

    sys.path.append(str(ROOT))  # appended: none of the project's modules may shadow a library torch imports
    import fastpath

    # The allocator settings bench/run.py gives MLX's process (as main.py does): without them every torch step
    # faults its freed buffers back in, tens of thousands of page faults a step that MLX's step does not pay.
    fastpath.keep_freed_memory()
    worker_loop()
