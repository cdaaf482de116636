"""kernels.py: the CPU softmax / log-sum-exp / attention agree with MLX's own ops, in value and gradient."""

import mlx.core as mx
import numpy as np
import pytest

import kernels
from layers import padding_mask


def test_exp_nonpositive_matches_float64_exp_to_float32_precision():
    x = np.concatenate([np.linspace(-87, 0, 100_001), [-1e9, -200.0, -0.0]]).astype(np.float32)
    got = np.array(kernels.exp_nonpositive(mx.array(x)), dtype=np.float64)
    want = np.exp(x.astype(np.float64))
    normal = want > 1e-37
    np.testing.assert_allclose(got[normal], want[normal], rtol=3e-7)
    assert np.all(got[~normal] < 1.1e-37) and np.all(got >= 0)  # clamped far tail: ~0, never negative or NaN


@pytest.mark.parametrize("shape", [(3, 7), (2, 4, 5, 33)])
def test_softmax_and_logsumexp_match_mlx_with_gradients(shape):
    x = mx.random.normal(shape, key=mx.random.key(0)) * 8
    w = mx.random.normal(shape, key=mx.random.key(1))
    np.testing.assert_allclose(kernels.softmax(x), mx.softmax(x, axis=-1), atol=1e-6)
    np.testing.assert_allclose(kernels.logsumexp(x), mx.logsumexp(x, axis=-1, keepdims=True), rtol=1e-6)
    ws = w[..., :1]
    pairs = [
        (lambda a: (kernels.softmax(a) * w).sum(), lambda a: (mx.softmax(a, axis=-1) * w).sum()),
        (lambda a: (kernels.logsumexp(a) * ws).sum(), lambda a: (mx.logsumexp(a, axis=-1, keepdims=True) * ws).sum()),
    ]
    for ours, theirs in pairs:
        np.testing.assert_allclose(mx.grad(ours)(x), mx.grad(theirs)(x), atol=2e-6)


def test_softmax_of_masked_positions_is_zero_and_rows_sum_to_one():
    x = mx.array([[0.5, -1e9, 2.0, -1e9], [-1e9, -1e9, -1e9, -1e9]])
    p = np.array(kernels.softmax(x))
    assert p[0, 1] < 1e-30 and p[0, 3] < 1e-30
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p[1], 0.25, rtol=1e-6)  # a fully masked row is uniform, as in mx.softmax


def test_attention_matches_fused_kernel_with_padding_mask_and_gradients():
    keys = mx.random.split(mx.random.key(2), 3)
    q, k, v = (mx.random.normal((2, 4, 6, 8), key=key) for key in keys)
    mask = padding_mask(mx.array([[True] * 6, [True] * 4 + [False] * 2]))

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) ** 2).sum()

    ours = lambda q, k, v: kernels.attention(q, k, v, 0.35, mask)
    fused = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask=mask)
    np.testing.assert_allclose(ours(q, k, v), fused(q, k, v), atol=1e-5)
    for a, b in zip(mx.grad(loss(ours), argnums=(0, 1, 2))(q, k, v), mx.grad(loss(fused), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-4)
