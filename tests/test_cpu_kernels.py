"""cpu_kernels.py: the CPU softmax / log-sum-exp / attention / RoPE agree with MLX's own ops, in value and gradient."""

import mlx.core as mx
import numpy as np
import pytest

import cpu_kernels
from layers import padding_mask


def test_exp_nonpositive_matches_float64_exp_to_float32_precision():
    x = np.concatenate([np.linspace(-87, 0, 100_001), [-1e9, -200.0, -0.0]]).astype(np.float32)
    got = np.array(cpu_kernels.exp_nonpositive(mx.array(x)), dtype=np.float64)
    want = np.exp(x.astype(np.float64))
    normal = want > 1e-37
    np.testing.assert_allclose(got[normal], want[normal], rtol=3e-7)
    assert np.all(got[~normal] < 1.1e-37) and np.all(got >= 0)  # clamped far tail: ~0, never negative or NaN


def test_exp_nonpositive_subtracts_a_broadcast_shift():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 3, 50)) * 10).astype(np.float32)
    top = x.max(axis=-1, keepdims=True)  # one shift per row, as a softmax uses it
    got = np.array(cpu_kernels.exp_nonpositive(mx.array(x), mx.array(top)), dtype=np.float64)
    # the subtraction rounds in float32, as it does before any exp of x - max
    np.testing.assert_allclose(got, np.exp((x - top).astype(np.float64)), rtol=3e-7, atol=1e-37)
    y = x - np.float32(40.0)
    scalar = np.array(cpu_kernels.exp_nonpositive(mx.array(y), -10.0), dtype=np.float64)
    np.testing.assert_allclose(scalar, np.exp((y + np.float32(10.0)).astype(np.float64)), rtol=3e-7, atol=1e-37)


@pytest.mark.parametrize("shape", [(3, 7), (2, 4, 5, 33)])
def test_softmax_and_logsumexp_match_mlx_with_gradients(shape):
    x = mx.random.normal(shape, key=mx.random.key(0)) * 8
    w = mx.random.normal(shape, key=mx.random.key(1))
    np.testing.assert_allclose(cpu_kernels.softmax(x), mx.softmax(x, axis=-1), atol=1e-6)
    np.testing.assert_allclose(cpu_kernels.logsumexp(x), mx.logsumexp(x, axis=-1, keepdims=True), rtol=1e-6)
    ws = w[..., :1]
    pairs = [
        (lambda a: (cpu_kernels.softmax(a) * w).sum(), lambda a: (mx.softmax(a, axis=-1) * w).sum()),
        (
            lambda a: (cpu_kernels.logsumexp(a) * ws).sum(),
            lambda a: (mx.logsumexp(a, axis=-1, keepdims=True) * ws).sum(),
        ),
    ]
    for ours, theirs in pairs:
        np.testing.assert_allclose(mx.grad(ours)(x), mx.grad(theirs)(x), atol=2e-6)


def test_logsumexp_of_masked_rows_has_the_softmax_as_its_gradient():
    """At -1e9 float32's spacing is 64, so the log-sum rounds to the row's max: a gradient taken as exp(x - output)
    gave every entry 1 instead of 1/n. A row all -inf is -inf, not NaN."""
    x = mx.array([[0.5, -1.0, 2.0, 0.0], [-1e9, -1e9, -1e9, -1e9], [-1e9, -1e9 - 64, -1e9, -1e9]])
    ours = mx.grad(lambda a: cpu_kernels.logsumexp(a).sum())(x)
    theirs = mx.grad(lambda a: mx.logsumexp(a, axis=-1, keepdims=True).sum())(x)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    np.testing.assert_allclose(np.array(ours).sum(axis=1), 1.0, rtol=1e-6)
    assert np.array(cpu_kernels.logsumexp(mx.full((2, 4), -float("inf")))).tolist() == [[-np.inf], [-np.inf]]


def test_softmax_of_masked_positions_is_zero_and_rows_sum_to_one():
    x = mx.array([[0.5, -1e9, 2.0, -1e9], [-1e9, -1e9, -1e9, -1e9]])
    p = np.array(cpu_kernels.softmax(x))
    assert p[0, 1] < 1e-30 and p[0, 3] < 1e-30
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p[1], 0.25, rtol=1e-6)  # a fully masked row is uniform, as in mx.softmax


def test_attention_matches_fused_kernel_with_padding_mask_and_gradients():
    keys = mx.random.split(mx.random.key(2), 3)
    q, k, v = (mx.random.normal((2, 4, 6, 8), key=key) for key in keys)
    mask = padding_mask(mx.array([[True] * 6, [True] * 4 + [False] * 2]))

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) ** 2).sum()

    ours = lambda q, k, v: cpu_kernels.attention(q, k, v, 0.35, mask)
    fused = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask=mask)
    np.testing.assert_allclose(ours(q, k, v), fused(q, k, v), atol=1e-5)
    for a, b in zip(mx.grad(loss(ours), argnums=(0, 1, 2))(q, k, v), mx.grad(loss(fused), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("offset", [0, 5])
def test_rope_matches_mlx_fast_rope_on_a_heads_view_with_gradients(offset):
    # the heads of a fused projection: a strided [B, H, L, d] view of [B, L, H * d], as SelfAttention passes them
    x = mx.random.normal((2, 7, 3 * 16), key=mx.random.key(3)) * 4
    w = mx.random.normal((2, 3, 7, 16), key=mx.random.key(4))

    def heads(a):
        return a.reshape(2, 7, 3, 16).transpose(0, 2, 1, 3)

    def theirs(a):
        return mx.fast.rope(heads(a), 16, traditional=False, base=10000.0, scale=1.0, offset=offset)

    def ours(a):
        return cpu_kernels.rope(heads(a), base=10000.0, offset=offset)[0]

    np.testing.assert_allclose(ours(x), theirs(x), atol=1e-5)
    assert not np.allclose(ours(x), heads(x), atol=1e-2)  # it does rotate
    grads = [mx.grad(lambda a, f=f: (f(a) * w).sum())(x) for f in (ours, theirs)]
    np.testing.assert_allclose(grads[0], grads[1], atol=1e-5)
    compiled = mx.compile(mx.grad(lambda a: (ours(a) * w).sum()))
    np.testing.assert_allclose(compiled(x), grads[1], atol=1e-5)
    # queries and keys rotated in one call (one set of tables) each come out as if rotated alone
    q_rot, k_rot = cpu_kernels.rope(heads(x), w, base=10000.0, offset=offset)
    np.testing.assert_allclose(q_rot, theirs(x), atol=1e-5)
    np.testing.assert_allclose(
        k_rot, mx.fast.rope(w, 16, traditional=False, base=10000.0, scale=1.0, offset=offset), atol=1e-5
    )


def test_rope_tables_kept_between_calls_rotate_exactly_as_fresh_ones():
    # a decoder's cache keeps the tables and slices each step's rows; they grow by doubling past 64 positions,
    # and another head width gets tables of its own; every rotation is bit for bit the one built for it alone
    tables: dict = {}
    x = mx.random.normal((2, 3, 1, 16), key=mx.random.key(7))
    for offset in [0, 1, 2, 63, 64, 65, 130]:
        kept = cpu_kernels.rope(x, base=10000.0, offset=offset, tables=tables)[0]
        assert mx.array_equal(kept, cpu_kernels.rope(x, base=10000.0, offset=offset)[0])
    assert tables[16, 10000.0][0].shape[0] == 262  # grown twice: 64 -> 130 -> 262
    several = mx.random.normal((2, 3, 5, 8), key=mx.random.key(8))  # 5 positions at once, narrower heads
    kept = cpu_kernels.rope(several, base=10000.0, offset=3, tables=tables)[0]
    assert mx.array_equal(kept, cpu_kernels.rope(several, base=10000.0, offset=3)[0])
    assert sorted(tables) == [(8, 10000.0), (16, 10000.0)]


def test_rope_keeps_norms_and_is_relative():
    # a rotation: each head vector keeps its length, and q.k depends on the positions' difference only
    q = mx.random.normal((1, 1, 1, 8), key=mx.random.key(5))
    k = mx.random.normal((1, 1, 1, 8), key=mx.random.key(6))
    rotated = [
        (cpu_kernels.rope(q, base=100.0, offset=p + 3)[0], cpu_kernels.rope(k, base=100.0, offset=p)[0])
        for p in (0, 9, 40)
    ]
    dots = [(a * b).sum().item() for a, b in rotated]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-5)
    np.testing.assert_allclose(
        mx.linalg.norm(cpu_kernels.rope(q, base=100.0, offset=17)[0]), mx.linalg.norm(q), rtol=1e-6
    )
