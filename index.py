"""The chunk-embedding index: built once per retriever checkpoint, cached, searched top-K by inner product."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import checkpoint as ckpt
import distributed as dist
from metrics import mean_reciprocal_rank, recall_at_k

INDEX_KINDS = ("exact", "faiss", "usearch")


def embed(model, tokens: np.ndarray, batch_size: int = 256, progress: bool = False) -> mx.array:
    """Embed rows of token ids in large batches; returns [N, E] float32."""
    out = []
    rng = range(0, len(tokens), batch_size)
    if progress:
        from tqdm import tqdm

        rng = tqdm(rng, desc="embedding chunks", unit="batch", leave=False, disable=None)  # None: off when not a TTY
    for i in rng:
        out.append(model.embed_rows(np.asarray(tokens[i : i + batch_size])))  # packed, over the CPU's cores
    return mx.concatenate(out, axis=0) if out else mx.zeros((0, model.args.embedding_dim))


def embed_distributed(model, tokens: np.ndarray, batch_size: int = 256, progress: bool = False) -> mx.array:
    """`embed` with the rows split across the `mlx.launch` processes and gathered back (all ranks get all
    rows, in order); exactly `embed` when alone."""
    if dist.size() == 1:
        return embed(model, tokens, batch_size, progress)
    local = embed(model, dist.shard(tokens, dist.rank(), dist.size()), batch_size, progress and dist.is_main())
    return dist.all_gather_rows(local)


def search(queries: mx.array, index, k: int, max_scores: int = 1 << 23) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product for many queries at once, best first.

    Tiles of at most `max_scores` scores (a block of queries x a block of index rows, small enough to stay in
    cache): one matmul and a two-stage partial sort (`topk_rows`) per tile, then a merge of the tiles' top-k.
    `index` is an [N, E] array, or a `ShardedIndex` / approximate index (anything with `.search`)."""
    if not isinstance(index, mx.array):
        return index.search(queries, k)
    N = index.shape[0]
    k = min(k, N)
    query_block = int(np.clip(max_scores // max(N, 1), 64, 4096))
    row_block = max(max_scores // query_block, k)
    all_scores, all_ids = [], []
    for i in range(0, queries.shape[0], query_block):
        block = queries[i : i + query_block]
        tiles = [topk_rows(block @ index[j : j + row_block].T, min(k, N - j)) for j in range(0, N, row_block)]
        ids = mx.concatenate([t_ids + j for (t_ids, _), j in zip(tiles, range(0, N, row_block))], axis=1)
        top = mx.concatenate([t_top for _, t_top in tiles], axis=1)
        if len(tiles) > 1:
            best = mx.argpartition(-top, kth=k - 1, axis=1)[:, :k]
            ids, top = mx.take_along_axis(ids, best, axis=1), mx.take_along_axis(top, best, axis=1)
        order = mx.argsort(-top, axis=1)
        ids, top = mx.take_along_axis(ids, order, axis=1), mx.take_along_axis(top, order, axis=1)
        mx.eval(ids, top)
        all_scores.append(np.array(top))
        all_ids.append(np.array(ids))
    if not all_ids:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(all_scores), np.concatenate(all_ids).astype(np.int64)


def topk_rows(scores: mx.array, k: int, group: int = 64) -> tuple[mx.array, mx.array]:
    """The k largest entries of each row of `scores` [Q, N] (ids and values, unordered), exactly.

    A partial sort of all Q x N scores runs on one core and costs far more than the matmul that made them. So:
    split each row into groups of `group` columns and take each group's maximum (one vectorised pass); the k
    groups with the largest maxima hold the top k (a group holding a top-k entry has a maximum at least the
    k-th best score, and at most k groups can), so the partial sort runs over N / group maxima and then over
    the k x group candidates of the chosen groups."""
    Q, N = scores.shape
    num_groups = N // group
    if num_groups <= 2 * k:
        ids = mx.argpartition(-scores, kth=k - 1, axis=1)[:, :k]
        return ids, mx.take_along_axis(scores, ids, axis=1)
    whole = num_groups * group
    maxima = scores[:, :whole].reshape(Q, num_groups, group).max(axis=2)
    if whole < N:  # the columns left over form one short last group
        maxima = mx.concatenate([maxima, scores[:, whole:].max(axis=1, keepdims=True)], axis=1)
    groups = mx.argpartition(-maxima, kth=k - 1, axis=1)[:, :k]
    cols = (groups[:, :, None] * group + mx.arange(group)[None, None, :]).reshape(Q, k * group)
    inside = cols < N  # the short last group's candidates past the end
    cols = mx.minimum(cols, N - 1)
    candidates = mx.where(inside, mx.take_along_axis(scores, cols, axis=1), -mx.inf)
    best = mx.argpartition(-candidates, kth=k - 1, axis=1)[:, :k]
    return mx.take_along_axis(cols, best, axis=1), mx.take_along_axis(candidates, best, axis=1)


def index_path(directory: str | Path, retriever_id: str) -> Path:
    """The single-file cache `<id>.embedding.safetensors` of earlier versions: no longer written or read (it
    records no fingerprint of its chunks), only recognised, to say why the index is built again."""
    return Path(directory) / f"{retriever_id}.embedding.safetensors"


def manifest_path(directory: str | Path, name: str) -> Path:
    """The JSON that lists an index's `<name>.embedding-<i>-of-<n>.npy` shards (written last)."""
    return Path(directory) / f"{name}.embedding.json"


def shard_path(directory: str | Path, name: str, i: int, n: int) -> Path:
    return Path(directory) / f"{name}.embedding-{i}-of-{n}.npy"


# An index up to this size is read into memory once; a larger one stays memory-mapped and is searched a block of
# rows at a time, so it may exceed RAM.
IN_MEMORY_BYTES = 2 << 30
ROWS_PER_BLOCK = 1 << 20


def chunks_fingerprint(chunks: np.ndarray, rows_per_block: int = ROWS_PER_BLOCK) -> str:
    """sha1 of the chunk token array (shape, dtype and bytes), recorded in the index caches so that embeddings of
    other chunks are never served: the retriever id and the number of chunks cannot tell them apart (the
    tokenizer does not depend on --context_size, so a re-chunked corpus keeps its retriever and may keep its
    count). Read a block of rows at a time, as the chunks may be memory-mapped (1M x 64 int32: ~0.5 s)."""
    digest = hashlib.sha1(f"{chunks.shape} {chunks.dtype}".encode())
    for start in range(0, len(chunks), rows_per_block):
        digest.update(np.ascontiguousarray(chunks[start : start + rows_per_block]))
    return digest.hexdigest()


def _check_source(meta: dict, retriever_id: str, num_chunks: int, fingerprint: str | None) -> None:
    """ValueError unless a cache's JSON `meta` names this retriever, number of chunks and, when given, chunk
    fingerprint (`chunks_fingerprint`; a cache written before fingerprints were recorded has none)."""
    if meta.get("retriever") != retriever_id or meta.get("num_chunks") != num_chunks:
        raise ValueError("belongs to another retriever or corpus")
    if fingerprint is not None and meta.get("chunks_sha1") != fingerprint:
        if meta.get("chunks_sha1") is None:
            raise ValueError("records no fingerprint of its chunks (an earlier version's cache)")
        raise ValueError("was built from other chunks (the corpus re-chunked or re-tokenized)")


class ShardedIndex:
    """An exact index held as row shards: mx arrays in memory, or memory-mapped .npy files searched one block of
    `rows_per_block` rows at a time.

    Each block gives its own top-k; the union of the blocks' top-k holds the global top-k, so merging them by
    score is exact (ties aside)."""

    def __init__(self, shards: list, in_memory: bool = True, rows_per_block: int = ROWS_PER_BLOCK):
        if not shards:
            raise ValueError("a sharded index needs at least one shard")
        self.offsets = np.cumsum([0] + [len(s) for s in shards])
        self.shards = [s if isinstance(s, mx.array) or not in_memory else mx.array(np.asarray(s)) for s in shards]
        self.shape = (int(self.offsets[-1]), int(shards[0].shape[1]))
        self.rows_per_block = rows_per_block

    def blocks(self):
        """(first row, mx block) pairs covering the index in order."""
        for offset, shard in zip(self.offsets, self.shards):
            if isinstance(shard, mx.array):
                yield int(offset), shard
                continue
            for start in range(0, len(shard), self.rows_per_block):
                yield int(offset) + start, mx.array(np.asarray(shard[start : start + self.rows_per_block]))

    def search(self, queries: mx.array, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.shape[0])
        if len(self.shards) == 1 and isinstance(self.shards[0], mx.array):
            return search(queries, self.shards[0], k)
        scores, ids = [], []
        for offset, block in self.blocks():
            if len(block):
                s, i = search(queries, block, k)
                scores.append(s)
                ids.append(i + offset)
        return merge_topk(np.concatenate(scores, axis=1), np.concatenate(ids, axis=1), k)

    def to_array(self) -> mx.array:
        return mx.concatenate([block for _, block in self.blocks()])


def merge_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (score, id) pairs of each row, best first (candidates from several shards side by side)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def write_shard(model, chunks, path: Path, batch_size: int = 256, progress: bool = False) -> None:
    """Embed the token rows `chunks` straight into the .npy file `path`, one batch at a time (the file is
    memory-mapped, so only a batch is ever in RAM), written atomically. Each batch's rows are spread over the
    cores, as in `embed` (same values; 4,221 chunks 4.8 -> 3.1 s on 2 cores)."""
    from tqdm import tqdm

    def fill(tmp: Path) -> None:
        shape = (len(chunks), model.args.embedding_dim)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        starts = range(0, len(chunks), batch_size)
        for i in tqdm(starts, desc="embedding chunks", unit="batch", leave=False, disable=None if progress else True):
            out[i : i + batch_size] = np.array(model.embed_rows(np.asarray(chunks[i : i + batch_size])))
        out.flush()
        del out

    ckpt.atomic_write_path(path, fill)


def write_manifest(
    directory, name: str, retriever_id: str, num_chunks: int, dim: int, num_shards: int, fingerprint: str | None = None
) -> Path:
    """The manifest of a complete set of shards (written last: an index without it is never read), with the
    `chunks_fingerprint` of the chunks embedded (None: unknown, and read back only unchecked)."""
    bounds = [dist.shard_bounds(num_chunks, i, num_shards) for i in range(num_shards)]
    files = [
        {"file": shard_path(directory, name, i, num_shards).name, "rows": b - a} for i, (a, b) in enumerate(bounds)
    ]
    meta = {"retriever": retriever_id, "num_chunks": num_chunks, "chunks_sha1": fingerprint, "dim": dim}
    meta.update(dtype="float32", shards=files)
    manifest = manifest_path(directory, name)
    ckpt.atomic_write_json(manifest, meta)
    return manifest


def open_sharded(
    manifest: Path, retriever_id: str, num_chunks: int, in_memory: bool | None = None, fingerprint: str | None = None
) -> ShardedIndex:
    """Open an index from its manifest, shards memory-mapped, and read into memory when `in_memory` (default:
    when it is at most IN_MEMORY_BYTES). ValueError if it belongs to another retriever or corpus, was built from
    chunks other than those of `fingerprint` (when given), or a shard is missing or the wrong size."""
    meta = json.loads(manifest.read_text())
    _check_source(meta, retriever_id, num_chunks, fingerprint)
    shards = []
    for entry in meta["shards"]:
        arr = np.load(manifest.parent / entry["file"], mmap_mode="r")
        if arr.ndim != 2 or len(arr) != entry["rows"] or arr.shape[1] != meta["dim"]:
            raise ValueError(f"shard {entry['file']} has shape {arr.shape}, expected ({entry['rows']}, {meta['dim']})")
        shards.append(arr)
    if in_memory is None:
        in_memory = num_chunks * meta["dim"] * 4 <= IN_MEMORY_BYTES
    return ShardedIndex(shards, in_memory=in_memory)


def _read_cache(directory: Path, name: str, retriever_id: str, num_chunks: int, fingerprint: str, log):
    """The cached index called `name`, or None when absent or unusable (an earlier version's single file is
    never used: it records no fingerprint of its chunks)."""
    manifest = manifest_path(directory, name)
    if manifest.is_file():
        try:
            return open_sharded(manifest, retriever_id, num_chunks, fingerprint=fingerprint)
        except (OSError, ValueError, KeyError) as e:
            log(f"warning: {manifest.name}: {e}; rebuilding")
    path = index_path(directory, name)
    if path.is_file():
        log(f"warning: {path.name} records no fingerprint of its chunks (an earlier version's cache); rebuilding")
    return None


def _quiet(_msg: str) -> None:
    pass


def load_or_build(
    model,
    retriever_id: str,
    chunks: np.ndarray,
    directory: str | Path,
    log=print,
    embedding_identifier: str | None = None,
    kind: str = "exact",
    embeddings: mx.array | None = None,
):
    """The chunk index of this retriever checkpoint: read from its cache, or built and cached (from `embeddings`
    of every chunk by this checkpoint when the caller has them: the retriever's last evaluation; a ValueError
    when they are not one per chunk).

    A cache whose metadata names another retriever, or other chunks (their number or `chunks_fingerprint`), is
    rebuilt (on every rank, if any rank must rebuild); `embedding_identifier` (an id or a unique prefix) names the
    cache to read instead of the retriever's own, and one that does not fit is an error. The cache is
    `<id>.embedding-<i>-of-<n>.npy` shards (one per process that built it) and `<id>.embedding.json`, written
    last; any number of processes can read it back. Building streams each process's embeddings into its shard,
    so an index larger than RAM can be built and searched. `kind` "faiss" or "usearch" returns an approximate
    index built from (and cached beside) the exact embeddings."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"--index must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    directory = Path(directory)
    if embeddings is not None and len(embeddings) != len(chunks):
        raise ValueError(f"embeddings of {len(embeddings):,} chunks given for an index of {len(chunks):,}")
    fingerprint = chunks_fingerprint(chunks)
    if embedding_identifier:  # a cache the user named: that one, or an error (never a silent rebuild)
        name = ckpt.resolve_id(directory, "embedding", embedding_identifier, what="--embedding_identifier")
        index = _read_cache(directory, name, retriever_id, len(chunks), fingerprint, _quiet)
        if index is None:
            raise ckpt.CheckpointError(
                f"--embedding_identifier {embedding_identifier}: {manifest_path(directory, name).name} is not an "
                f"index of retriever {retriever_id[:12]} over these {len(chunks):,} chunks"
            )
    else:
        name = retriever_id
        index = _read_cache(directory, name, retriever_id, len(chunks), fingerprint, log)
    # Every rank must take part in building if any must (a rank without the shared folder would otherwise hang).
    if dist.any_flag(index is None):
        index = _build(model, retriever_id, chunks, fingerprint, directory, log, embeddings)
        name = retriever_id
    if kind == "exact":
        return index
    emb = index.to_array()
    return load_or_build_approximate(emb, directory, name, retriever_id, kind, log, fingerprint=fingerprint)


def _build(
    model, retriever_id: str, chunks: np.ndarray, fingerprint: str, directory: Path, log, embeddings=None
) -> ShardedIndex:
    """Each rank embeds its contiguous share of the chunks into its own shard file (or writes its rows of
    `embeddings`, already computed by every rank); rank 0 writes the manifest, with the chunks' `fingerprint`.
    A stale manifest is removed first, so that a build interrupted partway never leaves one naming new shards.
    Ranks whose folders are not shared (separate machines without a network folder) exchange their shards so
    that every folder ends up complete (this fallback holds the whole index in memory)."""
    _, rank, size = dist.world()
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path(directory, retriever_id).unlink(missing_ok=True)  # every rank has read it (any_flag) by now
    paths = [shard_path(directory, retriever_id, r, size) for r in range(size)]
    start, stop = dist.shard_bounds(len(chunks), rank, size)
    tic = time.perf_counter()
    if embeddings is None:
        write_shard(model, chunks[start:stop], paths[rank], progress=dist.is_main())
    else:
        ckpt.atomic_write_with(paths[rank], lambda f: np.save(f, np.array(embeddings[start:stop], dtype=np.float32)))
    dist.barrier()
    elapsed = time.perf_counter() - tic
    if embeddings is not None:
        log(f"index: {len(chunks):,} chunk embeddings of the retriever's final evaluation written in {elapsed:.1f}s")
    else:
        log(
            f"index: embedded {len(chunks):,} chunks in {elapsed:.1f}s ({len(chunks) / max(elapsed, 1e-9):,.0f} "
            "chunks/s" + (f" over {size} processes)" if size > 1 else ")")
        )
    dim = model.args.embedding_dim
    shared = not dist.any_flag(not all(p.is_file() for p in paths))
    if not shared:
        log("index: the processes' folders are not shared; exchanging shards (the whole index in memory)")
        everything = np.array(dist.all_gather_rows(mx.array(np.load(paths[rank]))))
        for r, p in enumerate(paths):
            if not p.is_file():
                rows = everything[slice(*dist.shard_bounds(len(chunks), r, size))]
                ckpt.atomic_write_with(p, lambda f, a=rows: np.save(f, a))
    if rank == 0 or not shared:
        write_manifest(directory, retriever_id, retriever_id, len(chunks), dim, size, fingerprint)
    dist.barrier()
    return open_sharded(manifest_path(directory, retriever_id), retriever_id, len(chunks), fingerprint=fingerprint)


class ApproximateIndex:
    """Approximate inner-product search with faiss (IVF-Flat) or usearch (HNSW), behind the same `search`."""

    def __init__(self, kind: str, backend, num_rows: int, dim: int):
        self.kind, self.backend, self.shape = kind, backend, (num_rows, dim)

    def search(self, queries: mx.array, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k scores and chunk ids [Q, min(k, N)], best first, as `search` gives.

        The backends can find fewer than k: faiss IVF when the lists it probes hold fewer vectors, usearch HNSW
        when k nears the index size. The slots they leave empty must never pass for chunks (faiss's id -1 would
        index the last one), so those queries are searched again exhaustively (faiss probing every list, usearch
        in its exact mode), which finds k."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        k = min(k, self.shape[0])
        scores, ids = self._search(q, k)
        short = (ids < 0).any(axis=1)
        if short.any():
            scores[short], ids[short] = self._search(q[short], k, exhaustive=True)
        return scores, ids

    def _search(self, q: np.ndarray, k: int, exhaustive: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The backend's top-k as [Q, k] arrays, best first; a slot it left empty has id -1."""
        if self.kind == "faiss":
            import faiss

            params = faiss.SearchParametersIVF(nprobe=self.backend.nlist) if exhaustive else None
            scores, ids = self.backend.search(q, k, params=params)
            return scores.astype(np.float32), ids.astype(np.int64)
        return _usearch_results(self.backend.search(q, k, exact=exhaustive), k)


def _usearch_results(matches, k: int) -> tuple[np.ndarray, np.ndarray]:
    """usearch's matches as [Q, k] scores (its "ip" distance is 1 - dot) and ids, the slots past a query's count
    of results given id -1 and score -inf: several queries give `BatchMatches` padded with id 0 and NaN, one
    query a `Matches` of its results only."""
    keys = np.atleast_2d(np.asarray(matches.keys, dtype=np.int64))
    distances = np.atleast_2d(np.asarray(matches.distances, dtype=np.float32))
    counts = np.atleast_1d(getattr(matches, "counts", keys.shape[1]))
    width = ((0, 0), (0, k - keys.shape[1]))
    keys, distances = np.pad(keys, width), np.pad(distances, width)
    found = np.arange(k) < counts[:, None]
    return 1.0 - np.where(found, distances, np.inf), np.where(found, keys, -1)


def _faiss_build(emb: np.ndarray):
    import faiss

    n, d = emb.shape
    # IVF-Flat: ~4 sqrt(N) inverted lists (at least 39 training points each); 1/16 of them (at least 8) probed.
    nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(emb)
    index.add(emb)
    index.nprobe = min(nlist, max(8, nlist // 16))
    return index, {"type": "IVFFlat", "nlist": nlist, "nprobe": index.nprobe}


def _usearch_build(emb: np.ndarray):
    from usearch.index import Index

    index = Index(ndim=emb.shape[1], metric="ip", dtype="f32", connectivity=16, expansion_add=128, expansion_search=64)
    index.add(np.arange(len(emb), dtype=np.uint64), emb)
    return index, {"type": "HNSW", "connectivity": 16, "expansion_add": 128, "expansion_search": 64}


def approximate_path(directory: str | Path, name: str, kind: str) -> Path:
    return Path(directory) / f"{name}.embedding.{kind}"


def load_or_build_approximate(
    embeddings,
    directory: str | Path,
    name: str,
    retriever_id: str,
    kind: str,
    log=print,
    recall_queries: np.ndarray | None = None,
    k: int = 10,
    fingerprint: str | None = None,
) -> ApproximateIndex:
    """An approximate index of `embeddings`, read from `<name>.embedding.<kind>` (with a `.json` beside it) or
    built, cached and checked: it logs recall@k against exact search for `recall_queries` (default: 1,000
    stored embeddings, each finding itself among others, so slightly optimistic).

    The cache is read only when its JSON names this retriever, number of chunks and `fingerprint` (the
    `chunks_fingerprint` of the chunks embedded; unchecked when None), on every rank, or else built on every
    rank (and written by rank 0)."""
    directory = Path(directory)
    emb = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    path, meta_path = approximate_path(directory, name, kind), approximate_path(directory, name, kind + ".json")
    backend = _read_approximate(kind, path, meta_path, retriever_id, len(emb), fingerprint, log)
    if not dist.any_flag(backend is None):
        return ApproximateIndex(kind, backend, len(emb), emb.shape[1])
    tic = time.perf_counter()
    backend, params = _faiss_build(emb) if kind == "faiss" else _usearch_build(emb)
    built = time.perf_counter() - tic
    index = ApproximateIndex(kind, backend, len(emb), emb.shape[1])
    recall = approximate_recall(index, emb, recall_queries, k)
    log(
        f"index: {kind} {params['type']} over {len(emb):,} chunks built in {built:.1f}s; "
        f"recall@{k} vs exact search {recall:.3f}"
    )
    meta = {
        "retriever": retriever_id,
        "num_chunks": len(emb),
        "chunks_sha1": fingerprint,
        "kind": kind,
        "params": params,
        f"recall@{k}": recall,
        "build_seconds": built,
    }
    if dist.is_main():
        meta_path.unlink(missing_ok=True)  # first: an index file is never paired with another build's JSON
        ckpt.atomic_write_path(path, lambda tmp: _approximate_write(kind, backend, tmp))
        ckpt.atomic_write_json(meta_path, meta)  # last: marks the cache complete
    return index


def _read_approximate(
    kind: str, path: Path, meta_path: Path, retriever_id: str, num_chunks: int, fingerprint: str | None, log
):
    """The cached backend at `path`, or None when absent, or (said in a warning) when its JSON is unreadable or
    names another retriever or other chunks, or the index file itself is damaged."""
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        _check_source(meta, retriever_id, num_chunks, fingerprint)
        return _approximate_read(kind, path, meta)
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:  # json's; faiss raises RuntimeError
        log(f"warning: {path.name}: {_first_line(e)}; rebuilding")
        return None


def _first_line(e: Exception) -> str:
    """An exception in one line (faiss's messages run over several, with a C++ stack)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _approximate_write(kind: str, backend, path: Path) -> None:
    if kind == "faiss":
        import faiss

        faiss.write_index(backend, str(path))
    else:
        backend.save(str(path))


def _approximate_read(kind: str, path: Path, meta: dict):
    if kind == "faiss":
        import faiss

        index = faiss.read_index(str(path))
        index.nprobe = meta["params"]["nprobe"]
        return index
    from usearch.index import Index

    return Index.restore(str(path), view=True)  # memory-mapped


def approximate_recall(
    index, embeddings: np.ndarray, queries: np.ndarray | None = None, k: int = 10, n: int = 1000, seed: int = 0
) -> float:
    """Mean fraction of the exact top-k that the approximate index also returns."""
    emb = mx.array(embeddings)
    if queries is None:
        rows = np.random.default_rng(seed).choice(len(embeddings), size=min(n, len(embeddings)), replace=False)
        queries = embeddings[rows]
    q = mx.array(np.asarray(queries, dtype=np.float32))
    _, exact = search(q, emb, k)
    _, approx = index.search(q, k)
    hits = [len(set(a.tolist()) & set(e.tolist())) / len(e) for a, e in zip(approx, exact)]
    return float(np.mean(hits)) if hits else 1.0


def eval_chunk_ids(data, question_ids: np.ndarray, max_chunks: int, seed: int = 0) -> np.ndarray | None:
    """The chunks to score validation questions against during training: all of them (None) when there are at
    most `max_chunks`; else, sorted, the questions' labelled chunks plus a fixed random sample of the others,
    `max_chunks` in all. This bounds evaluation time and memory on corpora of millions of chunks; recall over a
    sample is optimistic (fewer distractors), so the final index is always evaluated whole."""
    n = len(data.chunks)
    if n <= max_chunks:
        return None
    labelled = np.unique(np.concatenate([data.positives(int(i)) for i in question_ids] + [np.zeros(0, np.int64)]))
    labelled = labelled[:max_chunks]
    others = np.setdiff1d(np.arange(n), labelled, assume_unique=True)
    extra = np.random.default_rng([seed, 4]).choice(others, size=max_chunks - len(labelled), replace=False)
    return np.sort(np.concatenate([labelled, extra]).astype(np.int64))


def evaluate(
    model, data, question_ids: np.ndarray, index=None, ks=(1, 5, 20), chunk_ids: np.ndarray | None = None
) -> dict:
    """Recall@k and MRR of `question_ids` against the chunk index (positives = labelled answer chunks). With
    `chunk_ids`, row i of `index` is chunk `chunk_ids[i]` (a sample, see `eval_chunk_ids`)."""
    if index is None:
        index = embed(model, data.chunks if chunk_ids is None else data.chunks[chunk_ids])
    q = embed(model, data.questions[question_ids])
    _, ids = search(q, index, max(ks))
    if chunk_ids is not None:
        ids = chunk_ids[ids]
    relevant = [set(data.positives(int(i)).tolist()) for i in question_ids]
    recall = recall_at_k(ids, relevant, ks=ks)
    out = {f"recall@{k}": float(v) for k, v in recall.items() if isinstance(k, int)}
    out["mrr"] = float(mean_reciprocal_rank(ids, relevant))
    return out
