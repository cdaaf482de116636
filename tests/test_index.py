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
