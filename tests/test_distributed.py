"""Data parallelism on mx.distributed: 2 ranks on loopback (`mlx.launch --backend ring`) against one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from helpers import ROOT, build_builtin

import distributed as dist  # noqa: E402
import index as chunk_index  # noqa: E402
import retriever as R  # noqa: E402

# Trains the tiny retriever a few steps through retriever.train (sharded batches, gathered negatives,
# distributed evaluation, rank-0 checkpoint), then builds the chunk index and writes the top-10 of 20 questions;
# then trains the tiny generator a few steps on every question's top-2 (sharded batches, each rank packing its
# own rows, summed gradients, rank-0 checkpoint).
WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    root, data_dir, out_dir, local = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1"
    separate = len(sys.argv) > 5  # every rank indexes into a folder of its own, as on machines sharing no disk
    sys.path.insert(0, root)
    import mlx.core as mx
    import numpy as np
    import datasets as D
    import distributed as dist
    import index as chunk_index
    import retriever as R

    mx.set_default_device(mx.cpu)
    mx.random.seed(0)
    data = D.Dataset(data_dir)
    ckdir = out_dir / "checkpoints"
    train = dict(batch_size=8, num_iters=4, learning_rate=1e-3, weight_decay=0.01, lr_warmup=2, steps_per_report=2,
                 steps_per_eval=4, keep=3, seed=0)
    quiet = print if dist.is_main() else (lambda m: None)
    model, rid, embedded = R.train(data, ckdir, train, dict(dim=32, num_blocks=1, num_heads=2, embedding_dim=16),
                         new_model=True, eval_questions=16, compile=False, local_negatives=local, log=quiet)
    index_dir = out_dir / f"index-{dist.rank()}" if separate else ckdir
    index = chunk_index.load_or_build(model, rid, data.chunks, index_dir, log=quiet, embeddings=embedded)
    _, ids = chunk_index.search(chunk_index.embed(model, data.questions[:20]), index, 10)
    import generator as G

    _, retrieved = chunk_index.search(chunk_index.embed(model, data.questions), index, 2)
    _, gid = G.train(data, ckdir, retrieved, dict(train, batch_size=6),
                     dict(dim=32, num_blocks=1, num_decoder_blocks=1, num_heads=2), rid, new_model=True,
                     eval_questions=6, log=quiet)  # compiled step
    if dist.is_main():
        np.save(out_dir / "topk.npy", ids)
        (out_dir / "result.json").write_text(json.dumps({"rid": rid, "gid": gid, "size": dist.size(),
                                                         "index": type(index).__name__}))
""")


def _launcher() -> list[str] | None:
    exe = shutil.which("mlx.launch")
    return [exe] if exe else None


def _free_port_pair() -> int:
    """A port p with p and p+1 free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair on 127.0.0.1")


def _run(tmp_path: Path, data_dir: Path, out: Path, ranks: int, local: bool = False, separate: bool = False) -> dict:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(script), str(ROOT), str(data_dir), str(out), "1" if local else "0"]
    cmd += ["separate"] if separate else []
    if ranks > 1:
        cmd = [*_launcher(), "-n", str(ranks), "--backend", "ring", "-p", str(_free_port_pair()), "--", *cmd]
    env = dict(os.environ, RAGMLX_FAST_BLAS="0")
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    result["stdout"] = proc.stdout
    return result


def _weights(out: Path, rid: str, kind: str = "retriever") -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(out / "checkpoints" / f"{rid}.{kind}.safetensors")).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if _launcher() is None:
        pytest.skip("mlx.launch is not on PATH (it comes with the mlx package)")
    tmp = tmp_path_factory.mktemp("dist")
    data_dir = tmp / "data"
    build_builtin(data_dir)
    return {
        "tmp": tmp,
        "data": data_dir,
        "one": _run(tmp, data_dir, tmp / "one", 1),
        "two": _run(tmp, data_dir, tmp / "two", 2),
    }


def test_two_ranks_train_the_same_parameters_as_one_process(runs):
    one, two = runs["one"], runs["two"]
    assert (one["size"], two["size"]) == (1, 2)
    a, b = _weights(runs["tmp"] / "one", one["rid"]), _weights(runs["tmp"] / "two", two["rid"])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, rtol=0, err_msg=k)
    assert two["stdout"].count("step      4/4") == 2, "rank 0 logs alone (the retriever's step 4, the generator's)"


def test_two_ranks_train_the_same_generator_as_one_process(runs):
    """Each rank packs its own share of the batch (plans made after sharding) and the gradients are summed over
    the ranks' tokens: the weights after 4 steps are the one-process weights up to float rounding."""
    one, two = runs["one"], runs["two"]
    a = _weights(runs["tmp"] / "one", one["gid"], "generator")
    b = _weights(runs["tmp"] / "two", two["gid"], "generator")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, rtol=0, err_msg=k)
    assert two["stdout"].count("saved generator") == 1, "rank 0 saves alone"


def test_local_negatives_is_a_different_loss(runs):
    """Without gathering, negatives are per rank: the result must differ, so the equality above means something."""
    local = _run(runs["tmp"], runs["data"], runs["tmp"] / "local", 2, local=True)
    a, c = _weights(runs["tmp"] / "one", runs["one"]["rid"]), _weights(runs["tmp"] / "local", local["rid"])
    assert max(float(np.abs(a[k] - c[k]).max()) for k in a) > 1e-4


def test_two_rank_sharded_index_returns_the_single_process_top_k(runs):
    two = runs["two"]
    assert two["index"] == "ShardedIndex"
    assert "not shared" not in two["stdout"]  # each rank wrote its own shard into the shared folder
    ckdir = runs["tmp"] / "two" / "checkpoints"
    assert sorted(p.name for p in ckdir.glob("*.embedding*")) == [
        f"{two['rid']}.embedding-0-of-2.npy",
        f"{two['rid']}.embedding-1-of-2.npy",
        f"{two['rid']}.embedding.json",
    ]
    manifest = json.loads(chunk_index.manifest_path(ckdir, two["rid"]).read_text())
    assert [s["file"] for s in manifest["shards"]] == [f"{two['rid']}.embedding-{i}-of-2.npy" for i in range(2)]
    # the same weights embedded in one process give the same top-10
    from helpers import tiny_retriever
    import datasets as D

    data = D.Dataset(runs["data"])
    model = tiny_retriever(data.vocab_size)
    model.load_weights(str(ckdir / f"{two['rid']}.retriever.safetensors"))
    single = chunk_index.embed(model, data.chunks)
    _, ids = chunk_index.search(chunk_index.embed(model, data.questions[:20]), single, 10)
    np.testing.assert_array_equal(np.load(runs["tmp"] / "two" / "topk.npy"), ids)
    # and the shards read back memory-mapped by one process (any number of processes can open them)
    opened = chunk_index.open_sharded(
        chunk_index.manifest_path(ckdir, two["rid"]), two["rid"], len(data.chunks), in_memory=False
    )
    np.testing.assert_array_equal(chunk_index.search(chunk_index.embed(model, data.questions[:20]), opened, 10)[1], ids)


def test_shard_bounds_cover_every_row_once():
    for n in (0, 1, 7, 8, 100):
        for size in (1, 2, 3, 5):
            rows = np.concatenate([np.arange(n)[slice(*dist.shard_bounds(n, r, size))] for r in range(size)])
            np.testing.assert_array_equal(rows, np.arange(n))
    with pytest.raises(ValueError, match="rank 2"):
        dist.shard_bounds(4, 2, 2)


def test_shard_contrastive_reorders_columns_to_the_gathered_order():
    B, M, N = 4, 4, 2
    questions = np.arange(B)[:, None]
    chunks = np.arange(B + M)[:, None] + 100
    mask = np.zeros((B, B + M), bool)
    mask[1, 6] = True  # question 1 also answered by negative chunk 6 (rank 1's second negative)
    q, c, m, t = R.shard_contrastive((questions, chunks, mask), 1, N)
    assert q[:, 0].tolist() == [2, 3]
    assert c[:, 0].tolist() == [102, 103, 106, 107]  # rank 1's positives, then its negatives
    # gathered order: rank 0 (pos 0 1, neg 4 5), rank 1 (pos 2 3, neg 6 7); question 2's positive is column 4
    assert t.tolist() == [4, 5]
    q0, _, m0, _ = R.shard_contrastive((questions, chunks, mask), 0, N)
    assert m0[1].tolist() == [False] * 6 + [True, False]
    _, c_local, m_local, t_local = R.shard_contrastive((questions, chunks, mask), 1, N, local_negatives=True)
    assert m_local.shape == (2, 4) and t_local.tolist() == [0, 1]


def test_one_process_helpers_are_identities():
    x = mx.arange(6).reshape(3, 2)
    assert dist.size() == 1 and dist.is_main()
    assert dist.all_gather_rows(x) is x and dist.gather_with_grad(x) is x and dist.all_sum(x) is x
    assert dist.any_flag(True) and not dist.any_flag(False)
    dist.agree(3, "anything")
    dist.barrier()


def test_approximate_indexes_find_most_of_the_exact_top_k(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3000, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    logs = []
    for kind in ("faiss", "usearch"):
        pytest.importorskip("faiss" if kind == "faiss" else "usearch")
        built = chunk_index.load_or_build_approximate(emb, tmp_path, "rid", "rid", kind, log=logs.append)
        assert (tmp_path / f"rid.embedding.{kind}").is_file()
        assert "recall@10 vs exact search" in logs[-1]
        cached = chunk_index.load_or_build_approximate(emb, tmp_path, "rid", "rid", kind, log=logs.append)
        assert len(logs) == (1 if kind == "faiss" else 2), "the second call reads the cache"
        assert chunk_index.approximate_recall(cached, emb) > 0.5
        _, ids = chunk_index.search(mx.array(emb[:5]), cached, 3)
        assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]  # each stored vector finds itself first
        assert chunk_index.approximate_recall(built, emb) == chunk_index.approximate_recall(cached, emb)


def test_ranks_without_a_shared_folder_each_get_the_complete_index(runs):
    out = runs["tmp"] / "separate"
    result = _run(runs["tmp"], runs["data"], out, 2, separate=True)
    assert "not shared; exchanging shards" in result["stdout"]
    np.testing.assert_array_equal(np.load(out / "topk.npy"), np.load(runs["tmp"] / "two" / "topk.npy"))
    import datasets as D

    num_chunks = len(D.Dataset(runs["data"]).chunks)
    for rank in range(2):
        folder = out / f"index-{rank}"
        opened = chunk_index.open_sharded(chunk_index.manifest_path(folder, result["rid"]), result["rid"], num_chunks)
        reference = runs["tmp"] / "two" / "checkpoints"
        for i in range(2):
            name = f"{result['rid']}.embedding-{i}-of-2.npy"
            np.testing.assert_allclose(np.load(folder / name), np.load(reference / name), rtol=1e-6, atol=1e-7)
        assert opened.shape[0] == num_chunks
