"""The chunk-embedding index: built once per retriever checkpoint, cached, searched top-K by inner product."""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import checkpoint as ckpt
from metrics import mean_reciprocal_rank, recall_at_k


def embed(model, tokens: np.ndarray, batch_size: int = 256, progress: bool = False) -> mx.array:
    """Embed rows of token ids in large batches; returns [N, E] float32."""
    out = []
    rng = range(0, len(tokens), batch_size)
    if progress:
        from tqdm import tqdm

        rng = tqdm(rng, desc="embedding chunks", unit="batch", leave=False)
    for i in rng:
        e = model(mx.array(np.asarray(tokens[i : i + batch_size])))
        mx.eval(e)
        out.append(e)
    return mx.concatenate(out, axis=0) if out else mx.zeros((0, model.args.embedding_dim))


def search(queries: mx.array, index: mx.array, k: int, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product for many queries at once: one matmul and a partial sort per batch."""
    k = min(k, index.shape[0])
    all_scores, all_ids = [], []
    for i in range(0, queries.shape[0], batch_size):
        scores = queries[i : i + batch_size] @ index.T
        ids = mx.argpartition(-scores, kth=k - 1, axis=1)[:, :k]
        top = mx.take_along_axis(scores, ids, axis=1)
        order = mx.argsort(-top, axis=1)
        ids, top = mx.take_along_axis(ids, order, axis=1), mx.take_along_axis(top, order, axis=1)
        mx.eval(ids, top)
        all_scores.append(np.array(top))
        all_ids.append(np.array(ids))
    if not all_ids:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(all_scores), np.concatenate(all_ids).astype(np.int64)


def index_path(directory: str | Path, retriever_id: str) -> Path:
    return Path(directory) / f"{retriever_id}.embedding.safetensors"


def load_or_build(model, retriever_id: str, chunks: np.ndarray, directory: str | Path, log=print,
                  embedding_identifier: str | None = None) -> mx.array:
    """The chunk index of this retriever checkpoint: read from its cache, or built and cached atomically.

    A cache whose metadata names another retriever, or with the wrong number of chunks, is rebuilt."""
    path = index_path(directory, embedding_identifier or retriever_id)
    if path.is_file():
        try:
            arrays, meta = mx.load(str(path), return_metadata=True)
            emb = arrays["embeddings"]
            if meta.get("retriever") == retriever_id and emb.shape[0] == len(chunks):
                return emb
            log(f"warning: {path.name} belongs to another retriever or corpus; rebuilding")
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            log(f"warning: {path.name} is unreadable ({e}); rebuilding")
        if embedding_identifier:
            path = index_path(directory, retriever_id)
    tic = time.perf_counter()
    emb = embed(model, chunks, progress=True)
    elapsed = time.perf_counter() - tic
    log(f"index: embedded {len(chunks):,} chunks in {elapsed:.1f}s ({len(chunks) / max(elapsed, 1e-9):,.0f} chunks/s)")
    ckpt.atomic_save_safetensors(path, {"embeddings": emb}, {"retriever": retriever_id, "num_chunks": str(len(chunks))})
    return emb


def evaluate(model, data, question_ids: np.ndarray, index: mx.array | None = None, ks=(1, 5, 20)) -> dict:
    """Recall@k and MRR of `question_ids` against the whole chunk index (positives = labelled answer chunks)."""
    if index is None:
        index = embed(model, data.chunks)
    q = embed(model, data.questions[question_ids])
    _, ids = search(q, index, max(ks))
    relevant = [set(data.positives(int(i)).tolist()) for i in question_ids]
    recall = recall_at_k(ids, relevant, ks=ks)
    out = {f"recall@{k}": float(v) for k, v in recall.items() if isinstance(k, int)}
    out["mrr"] = float(mean_reciprocal_rank(ids, relevant))
    return out
