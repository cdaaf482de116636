"""index.py: exact top-k search against a brute-force reference, and the chunk-embedding cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import index as chunk_index


def brute_force(queries: np.ndarray, emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ emb.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def unit_rows(rng, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(
    "rows, k, max_scores",
    [
        (5_000, 10, 1 << 23),  # one tile, grouped maxima (78 groups of 64 + a short last group)
        (5_003, 20, 1 << 14),  # many query blocks and row tiles, merged
        (300, 7, 1 << 23),  # too few groups: one plain partial sort
        (9, 20, 1 << 23),  # k larger than the index: every row, best first
    ],
)
def test_search_returns_the_brute_force_top_k_best_first(rows, k, max_scores):
    rng = np.random.default_rng(rows)
    emb, queries = unit_rows(rng, rows, 16), unit_rows(rng, 130, 16)
    scores, ids = chunk_index.search(mx.array(queries), mx.array(emb), k, max_scores=max_scores)
    want_scores, want_ids = brute_force(queries, emb, min(k, rows))
    assert ids.shape == (130, min(k, rows)) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


def test_topk_rows_finds_a_planted_maximum_in_every_group_position():
    scores = np.zeros((64, 64 * 40 + 5), np.float32)
    for r in range(64):  # row r plants its three best scores in the last group and at column offsets r and 63-r
        scores[r, [r, 64 * 20 + 63 - r, 64 * 40 + r % 5]] = [3.0, 2.0, 1.0]
    ids, top = chunk_index.topk_rows(mx.array(scores), 3)
    order = np.argsort(-np.array(top), axis=1)
    got = np.take_along_axis(np.array(ids), order, axis=1)
    want = np.stack([[r, 64 * 20 + 63 - r, 64 * 40 + r % 5] for r in range(64)])
    np.testing.assert_array_equal(got, want)


def random_chunks(rows: int, width: int = 12, vocab: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, vocab, size=(rows, width)).astype(np.int32)


def test_built_index_is_streamed_to_shards_and_matches_in_memory_search(tmp_path):
    from helpers import quiet, tiny_retriever

    model = tiny_retriever(50)
    chunks = random_chunks(700)
    np.save(tmp_path / "chunks.npy", chunks)
    on_disk = np.load(tmp_path / "chunks.npy", mmap_mode="r")  # the dataset's chunks are memory-mapped too
    index = chunk_index.load_or_build(model, "rid", on_disk, tmp_path / "ck", log=quiet)
    assert (tmp_path / "ck" / "rid.embedding.json").is_file()
    stored = np.load(tmp_path / "ck" / "rid.embedding-0-of-1.npy")
    np.testing.assert_allclose(stored, np.array(chunk_index.embed(model, chunks)), rtol=1e-5, atol=1e-6)
    queries = chunk_index.embed(model, random_chunks(40, seed=1))
    want = chunk_index.search(queries, mx.array(stored), 10)[1]
    np.testing.assert_array_equal(chunk_index.search(queries, index, 10)[1], want)
    # Larger than memory: the same shards searched memory-mapped, 64 rows at a time, give the same top-k.
    mapped = chunk_index.open_sharded(tmp_path / "ck" / "rid.embedding.json", "rid", 700, in_memory=False)
    mapped.rows_per_block = 64
    assert not isinstance(mapped.shards[0], mx.array)
    np.testing.assert_array_equal(chunk_index.search(queries, mapped, 10)[1], want)
    # and a second call reads the cache instead of embedding again
    logs = []
    chunk_index.load_or_build(model, "rid", on_disk, tmp_path / "ck", log=logs.append)
    assert not any("embedded" in line for line in logs)


def test_interrupted_build_leaves_no_index_and_the_next_build_completes(tmp_path):
    from helpers import quiet, tiny_retriever

    model = tiny_retriever(50)
    calls = {"n": 0}

    class Interrupting:
        args = model.args

        def embed_rows(self, tokens):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return model.embed_rows(tokens)

    chunks = random_chunks(600)
    with pytest.raises(KeyboardInterrupt):
        chunk_index.load_or_build(Interrupting(), "rid", chunks, tmp_path, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no shard, no manifest, no temp file
    index = chunk_index.load_or_build(model, "rid", chunks, tmp_path, log=quiet)
    assert index.shape == (600, model.args.embedding_dim)


def test_cache_of_another_retriever_or_corpus_is_rebuilt_and_legacy_single_file_is_rebuilt_once(tmp_path):
    from helpers import quiet, tiny_retriever

    import checkpoint as ckpt

    model = tiny_retriever(50)
    chunks = random_chunks(100)
    chunk_index.load_or_build(model, "rid", chunks, tmp_path, log=quiet)
    logs = []
    chunk_index.load_or_build(model, "rid", chunks[:90], tmp_path, log=logs.append)
    assert any("another retriever or corpus" in line for line in logs) and any("embedded 90" in x for x in logs)
    # An earlier version's single file records no fingerprint of its chunks: never served, built again once.
    emb = chunk_index.embed(model, chunks)
    ckpt.atomic_save_safetensors(
        chunk_index.index_path(tmp_path, "old"), {"embeddings": emb}, {"retriever": "old", "num_chunks": "100"}
    )
    logs = []
    rebuilt = chunk_index.load_or_build(model, "old", chunks, tmp_path, log=logs.append)
    assert "old.embedding.safetensors records no fingerprint of its chunks" in logs[0] and "embedded 100" in logs[1]
    np.testing.assert_allclose(np.asarray(rebuilt.to_array()), np.array(emb), rtol=1e-5, atol=1e-6)
    logs = []
    chunk_index.load_or_build(model, "old", chunks, tmp_path, log=logs.append)
    assert logs == []


def test_an_embedding_identifier_names_a_cache_or_is_an_error(tmp_path):
    """--embedding_identifier reads the cache it names (a unique prefix of >= 6 characters will do, in any case);
    one that is missing, ambiguous or built by another retriever or over other chunks is an error, never a silent
    rebuild."""
    from helpers import quiet, tiny_retriever

    import checkpoint as ckpt

    model, chunks = tiny_retriever(50), random_chunks(60)
    mine, other = "abc1230" + "0" * 33, "abc1231" + "0" * 33
    built = chunk_index.load_or_build(model, mine, chunks, tmp_path, log=quiet)
    chunk_index.load_or_build(model, other, chunks, tmp_path, log=quiet)
    logs = []
    named = chunk_index.load_or_build(model, mine, chunks, tmp_path, logs.append, embedding_identifier=" ABC1230 ")
    assert logs == [] and np.array_equal(np.asarray(named.to_array()), np.asarray(built.to_array()))
    for identifier, message in [
        ("fff000", "': not found in"),
        ("abc12", "': expected a sha1 id or a prefix of >= 6 hex characters"),
        ("abc123", "' is ambiguous in"),
    ]:
        with pytest.raises(ckpt.CheckpointError, match=f"--embedding_identifier '{identifier}{message}"):
            chunk_index.load_or_build(model, mine, chunks, tmp_path, log=quiet, embedding_identifier=identifier)
    with pytest.raises(ckpt.CheckpointError, match=f"{other}.embedding.json is not an index of retriever abc1230"):
        chunk_index.load_or_build(model, mine, chunks, tmp_path, log=quiet, embedding_identifier="abc1231")
    with pytest.raises(ckpt.CheckpointError, match="over these 50 chunks"):
        chunk_index.load_or_build(model, mine, chunks[:50], tmp_path, log=quiet, embedding_identifier="abc1230")


def test_cache_of_other_chunks_of_the_same_number_is_rebuilt_exact_and_approximate(tmp_path):
    """Re-chunking a corpus (another --context_size) keeps the tokenizer, hence the retriever, and can keep the
    number of chunks: only the chunks' fingerprint tells the caches' embeddings apart from the new chunks'."""
    pytest.importorskip("faiss")
    from helpers import quiet, tiny_retriever

    model = tiny_retriever(50)
    old, new = random_chunks(120, seed=0), random_chunks(120, seed=1)
    chunk_index.load_or_build(model, "rid", old, tmp_path, log=quiet, kind="faiss")
    logs = []
    approx = chunk_index.load_or_build(model, "rid", new, tmp_path, log=logs.append, kind="faiss")
    assert "rid.embedding.json: was built from other chunks" in logs[0] and "embedded 120" in logs[1]
    assert "rid.embedding.faiss: was built from other chunks" in logs[2] and "faiss IVFFlat" in logs[3]
    emb = np.array(chunk_index.embed(model, new))
    exact = chunk_index.load_or_build(model, "rid", new, tmp_path, log=quiet)
    np.testing.assert_allclose(np.asarray(exact.to_array()), emb, rtol=1e-5, atol=1e-6)
    _, ids = chunk_index.search(mx.array(emb[:5]), approx, 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]  # the new chunks' own embeddings, not the old ones'


def test_caches_written_without_a_chunk_fingerprint_are_rebuilt_once(tmp_path):
    import json

    pytest.importorskip("faiss")
    from helpers import quiet, tiny_retriever

    model = tiny_retriever(50)
    chunks = random_chunks(120)
    chunk_index.load_or_build(model, "rid", chunks, tmp_path, log=quiet, kind="faiss")
    for meta_path in (tmp_path / "rid.embedding.json", tmp_path / "rid.embedding.faiss.json"):
        meta = json.loads(meta_path.read_text())
        assert meta.pop("chunks_sha1") == chunk_index.chunks_fingerprint(chunks)
        meta_path.write_text(json.dumps(meta))  # as an earlier version wrote it
    logs = []
    chunk_index.load_or_build(model, "rid", chunks, tmp_path, log=logs.append, kind="faiss")
    assert "rid.embedding.json: records no fingerprint of its chunks" in logs[0] and "embedded 120" in logs[1]
    assert "rid.embedding.faiss: records no fingerprint of its chunks" in logs[2] and len(logs) == 4
    logs = []
    chunk_index.load_or_build(model, "rid", chunks, tmp_path, log=logs.append, kind="faiss")
    assert logs == []


def test_every_rank_builds_the_approximate_index_when_any_rank_must(tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    emb = unit_rows(np.random.default_rng(0), 200, 16)
    logs = []
    chunk_index.load_or_build_approximate(emb, tmp_path, "rid", "rid", "faiss", log=logs.append)
    chunk_index.load_or_build_approximate(emb, tmp_path, "rid", "rid", "faiss", log=logs.append)
    assert len(logs) == 1, "alone, the second call reads the cache"
    monkeypatch.setattr(chunk_index.dist, "any_flag", lambda flag: True)  # another rank's cache is stale
    chunk_index.load_or_build_approximate(emb, tmp_path, "rid", "rid", "faiss", log=logs.append)
    assert len(logs) == 2 and "faiss IVFFlat" in logs[1]


def test_a_damaged_approximate_index_file_is_rebuilt_not_a_traceback(tmp_path):
    pytest.importorskip("faiss")
    emb = unit_rows(np.random.default_rng(0), 200, 16)
    chunk_index.load_or_build_approximate(emb, tmp_path, "rid", "rid", "faiss", log=lambda _m: None)
    (tmp_path / "rid.embedding.faiss").write_bytes(b"not a faiss index")
    logs = []
    index = chunk_index.load_or_build_approximate(emb, tmp_path, "rid", "rid", "faiss", log=logs.append)
    assert "rid.embedding.faiss" in logs[0] and "rebuilding" in logs[0] and len(logs[0].splitlines()) == 1
    assert index.search(emb[:3], 1)[1][:, 0].tolist() == [0, 1, 2]


def assert_real_top_k(scores: np.ndarray, ids: np.ndarray, queries: np.ndarray, emb: np.ndarray, k: int) -> None:
    """Every id a real row, none repeated in a row, scores finite, the rows' inner products, best first."""
    assert ids.shape == scores.shape == (len(queries), k) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < len(emb)
    assert all(len(set(row.tolist())) == k for row in ids)
    assert np.isfinite(scores).all() and (np.diff(scores, axis=1) <= 1e-6).all()
    np.testing.assert_allclose(scores, np.einsum("qe,qke->qk", queries, emb[ids]), rtol=1e-4, atol=1e-5)


def test_faiss_queries_whose_probed_lists_hold_fewer_than_k_are_searched_exhaustively(tmp_path):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 16))
    emb = (centres[rng.integers(0, 40, 1000)] + 0.3 * rng.standard_normal((1000, 16))).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = chunk_index.load_or_build_approximate(emb, tmp_path, "rid", "rid", "faiss", log=lambda _: None)
    queries = emb[:200]
    short = (index.backend.search(queries, 300)[1] < 0).any(axis=1)  # faiss pads these with id -1
    assert short.sum() > 10
    scores, ids = chunk_index.search(mx.array(queries), index, 300)
    assert_real_top_k(scores, ids, queries, emb, 300)
    _, exact = brute_force(queries[short], emb, 300)
    np.testing.assert_array_equal(ids[short], exact)  # every list probed: the exact top-k


def test_usearch_queries_with_fewer_than_k_found_are_searched_exactly():
    pytest.importorskip("usearch")
    from usearch.index import Index

    emb = unit_rows(np.random.default_rng(0), 300, 16)
    # A sparse graph built on one thread: deterministic, and its search misses a few vectors when k = N.
    backend = Index(ndim=16, metric="ip", dtype="f32", connectivity=2, expansion_add=128, expansion_search=64)
    backend.add(np.arange(300, dtype=np.uint64), emb, threads=1)
    index = chunk_index.ApproximateIndex("usearch", backend, 300, 16)
    # several queries (usearch pads a short one with id 0 and NaN) and one (it returns fewer than k)
    for queries in (emb[:50], emb[:1]):
        found = backend.search(queries, 300)
        assert (np.asarray(getattr(found, "counts", [len(found.keys)])) < 300).all()
        scores, ids = chunk_index.search(mx.array(queries), index, 300)
        assert_real_top_k(scores, ids, queries, emb, 300)
        np.testing.assert_array_equal(np.sort(ids, axis=1), np.broadcast_to(np.arange(300), ids.shape))


def test_in_training_evaluation_on_a_sample_keeps_every_labelled_chunk(tmp_path):
    from helpers import build_builtin, tiny_retriever

    data = build_builtin(tmp_path / "data")
    model = tiny_retriever(data.vocab_size)
    valid = data.split_indices("valid")
    assert chunk_index.eval_chunk_ids(data, valid, len(data.chunks)) is None  # small corpus: all chunks
    size = len(data.chunks) // 2
    sample = chunk_index.eval_chunk_ids(data, valid, size)
    labelled = np.unique(np.concatenate([data.positives(int(i)) for i in valid]))
    assert len(sample) == size and np.all(np.diff(sample) > 0) and set(labelled) <= set(sample.tolist())
    np.testing.assert_array_equal(sample, chunk_index.eval_chunk_ids(data, valid, size))  # fixed between evals
    # Scoring against the sampled rows reports chunk ids of the whole corpus, as if the others were not there.
    got = chunk_index.evaluate(model, data, valid, chunk_ids=sample)
    emb = np.array(chunk_index.embed(model, data.chunks))
    masked = np.full_like(emb, 0.0)
    masked[sample] = emb[sample]
    q = np.array(chunk_index.embed(model, data.questions[valid]))
    scores = q @ masked.T
    scores[:, np.setdiff1d(np.arange(len(emb)), sample)] = -np.inf
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :20]
    from metrics import recall_at_k

    relevant = [set(data.positives(int(i)).tolist()) for i in valid]
    assert got["recall@5"] == pytest.approx(float(recall_at_k(ids, relevant, ks=(5,))[5]))


def test_final_evaluation_embeddings_become_the_index_without_embedding_again(tmp_path):
    from helpers import build_builtin, quiet

    import retriever as R

    data = build_builtin(tmp_path / "dataset", corpus_size=30, context_size=32)
    train = dict(batch_size=8, num_iters=4, lr_warmup=1, steps_per_report=2, steps_per_eval=3, seed=0)
    arch = dict(dim=32, num_blocks=1, num_heads=2, embedding_dim=16)
    ckdir = tmp_path / "checkpoints"
    model, rid, embedded = R.train(data, ckdir, train, arch, new_model=True, eval_questions=8, compile=False, log=quiet)
    assert embedded is not None  # evaluated at step 3 and at the last step, 4: the final weights' embeddings
    np.testing.assert_array_equal(embedded, chunk_index.embed(model, data.chunks))

    class NoEmbedding:
        args = model.args

        def embed_rows(self, tokens):
            raise AssertionError("the index must be written from the given embeddings")

    logs = []
    index = chunk_index.load_or_build(NoEmbedding(), rid, data.chunks, ckdir, log=logs.append, embeddings=embedded)
    assert "final evaluation" in logs[-1]
    np.testing.assert_array_equal(np.asarray(index.to_array()), np.array(embedded))
    # resumed at its last step: no evaluation, nothing handed over
    _, same_rid, none = R.train(data, ckdir, train, {}, eval_questions=8, compile=False, log=quiet)
    assert same_rid == rid and none is None
    # embeddings that are not one per chunk are the caller's mistake: refused before anything is written
    other = tmp_path / "other"
    with pytest.raises(ValueError, match="embeddings of 1 chunks given for an index of 2"):
        chunk_index.load_or_build(model, rid, data.chunks[:2], other, log=quiet, embeddings=embedded[:1])
    assert not other.exists()
