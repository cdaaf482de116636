"""Packed encoders (layers.Packing): the position-wise layers over real tokens only give the padded results."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from helpers import tiny_generator, tiny_retriever

import cores  # noqa: E402
import generator as G  # noqa: E402
import layers  # noqa: E402
import retriever as R  # noqa: E402
import training as T  # noqa: E402
from datasets import BOS_ID, EOS_ID, PAD_ID  # noqa: E402

V = 64


def ragged(rng, rows: int, width: int, shortest: int = 2) -> np.ndarray:
    """Random token rows, each PAD after a random length (at least `shortest`)."""
    t = rng.integers(4, V, size=(rows, width)).astype(np.int32)
    for r, n in enumerate(rng.integers(shortest, width + 1, size=rows)):
        t[r, n:] = PAD_ID
    return t


def test_plan_packing_lists_the_real_positions_then_pad_fillers_shared_over_slices(streams):
    streams(2)
    rng = np.random.default_rng(0)
    tokens = ragged(rng, 7, 20)
    valid = tokens != PAD_ID
    plans = layers.plan_packing(valid, granularity=16)
    assert len(plans) == 2  # one per row slice map_rows will use: rows 0-2 and 3-6
    (idx0, inv0), (idx1, inv1) = plans
    assert len(idx0) == len(idx1)  # one packed length for every slice: one shape for a compiled step
    n = len(idx0)
    step = -(-4 * 20 // 16)  # 1/16 of the largest slice's positions
    assert n % step == 0 and n >= max(valid[:3].sum(), valid[3:].sum()) and n < 3 * 20
    for rows, (idx, inv) in zip((slice(0, 3), slice(3, 7)), plans):
        flat = valid[rows].reshape(-1)
        real = np.flatnonzero(flat)
        np.testing.assert_array_equal(idx[: len(real)], real)  # the real tokens first, in order
        assert not flat[idx[len(real) :]].any()  # then fillers at pad positions
        np.testing.assert_array_equal(inv[real], np.arange(len(real)))
        assert (inv[~flat] == n).all()  # a pad position has no row
    # nothing to gain: no padding, or the rounding reaches the padded size
    assert layers.plan_packing(np.ones((4, 8), bool)) is None
    nearly_full = np.ones((4, 16), bool)
    nearly_full[0, -1] = False
    assert layers.plan_packing(nearly_full, spreading=False, granularity=4) is None
    assert len(layers.plan_packing(valid, spreading=False)) == 1  # one slice when nothing spreads


def test_rows_without_real_tokens_are_not_packed_and_embed_as_zeros(streams):
    """All padding packed to an empty array, which the encoder's unpacking could not read from; such rows (and an
    empty batch) embed as the padded model embeds them."""
    streams(2)
    assert layers.plan_packing(np.zeros((3, 8), bool)) is None
    retr = tiny_retriever(V)
    for tokens in (np.zeros((3, 8), np.int32), np.zeros((1, 8), np.int32), np.zeros((0, 8), np.int32)):
        with cores.spread():
            plain = retr(mx.array(tokens))
        got = retr.embed_rows(tokens)
        assert got.shape == plain.shape == (len(tokens), 16)
        np.testing.assert_array_equal(got, plain)


def test_packed_encoder_gives_the_padded_outputs_and_gradients():
    rng = np.random.default_rng(1)
    mx.random.seed(1)
    R_, L, D = 6, 12, 32
    encoder = layers.Encoder(D, 2, 4)
    valid = ragged(rng, R_, L) != PAD_ID
    plans = layers.plan_packing(valid, spreading=False, granularity=8)
    assert len(plans[0][0]) > valid.sum()  # fillers included
    packing = layers.Packing(*layers.to_device(plans)[0])
    x = mx.array(rng.normal(size=(R_, L, D)).astype(np.float32))
    mask = layers.padding_mask(mx.array(valid))
    weights = mx.array(rng.normal(size=(R_, L, D)).astype(np.float32)) * mx.array(valid)[..., None]

    def loss(params, x, packing):
        encoder.update(params)
        return (encoder(x, mask, packing) * weights).sum()  # reads real positions only

    results = []
    for p in (None, packing):
        value, (g_params, g_x) = mx.value_and_grad(loss, argnums=(0, 1))(encoder.trainable_parameters(), x, p)
        out = encoder(x, mask, p)
        results.append((value.item(), np.array(out)[valid], dict(tree_flatten(g_params)), np.array(g_x)))
    (v0, out0, gp0, gx0), (v1, out1, gp1, gx1) = results
    assert v1 == pytest.approx(v0, rel=1e-5)
    np.testing.assert_allclose(out1, out0, atol=1e-5)
    np.testing.assert_allclose(gx1, gx0, atol=1e-5)
    assert not gx1[~valid].any()  # pad inputs reach nothing, packed or not
    for k in gp0:
        np.testing.assert_allclose(gp1[k], gp0[k], atol=1e-4, rtol=1e-4, err_msg=k)


def loss_and_grads(model, loss_fn, batch):
    with cores.spread():
        (loss, (aux, ntok)), grads = nn.value_and_grad(model, loss_fn)(model, *T.batch_to_mx(batch))
        mx.eval(loss, aux, ntok, grads)
    return loss.item(), aux.item(), ntok.item(), dict(tree_flatten(grads))


def assert_same(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-5) and a[1] == pytest.approx(b[1], abs=1e-6) and a[2] == b[2]
    assert a[3].keys() == b[3].keys()
    for k in a[3]:
        np.testing.assert_allclose(a[3][k], b[3][k], atol=2e-5, rtol=1e-3, err_msg=k)


def fid_batch(rng, B: int = 5):
    passages = np.stack([ragged(rng, 3, 14) for _ in range(B)])
    answers = rng.integers(4, V, size=(B, 5)).astype(np.int32)
    answers[1, 3:] = PAD_ID
    answers[np.arange(B), 4] = EOS_ID
    answer_in = np.concatenate([np.full((B, 1), BOS_ID, np.int32), answers[:, :-1]], axis=1)
    return passages, answer_in, answers


@pytest.mark.parametrize("n_streams,checkpoint", [(1, False), (2, False), (2, True)])
def test_packed_generator_loss_and_gradients_equal_the_padded_ones(streams, n_streams, checkpoint):
    streams(n_streams)
    rng = np.random.default_rng(2)
    mx.random.seed(2)
    gen = tiny_generator(V, checkpoint=checkpoint)
    batch = fid_batch(rng)
    packed = G.with_packings(batch, cores.spreads())
    assert len(packed) == 4 and len(packed[3]) == n_streams
    assert_same(loss_and_grads(gen, G.seq2seq_loss, packed), loss_and_grads(gen, G.seq2seq_loss, batch))


def test_a_batch_with_a_question_of_no_real_token_is_not_packed(streams):
    """Such a row's cross-attention spreads evenly over pad positions, which packing fills with copies of a packed
    row: its loss and gradients differed (0.55 in the embeddings' gradient); the batch now runs padded."""
    streams(2)
    rng = np.random.default_rng(2)
    passages, answer_in, answers = fid_batch(rng)
    passages[1] = PAD_ID
    assert layers.plan_packing(passages != PAD_ID, cores.spreads()) is None
    batch = (passages, answer_in, answers)
    assert G.with_packings(batch, cores.spreads()) == batch  # no plans appended: the padded step
    passages[1, 0, :3] = rng.integers(4, V, size=3)  # one real token in the row: packed again
    assert len(G.with_packings(batch, cores.spreads())) == 4


def contrastive_batch(rng, full_questions: bool = False):
    questions = ragged(rng, 6, 9) if not full_questions else rng.integers(4, V, size=(6, 9)).astype(np.int32)
    mask = np.eye(6, 10, dtype=bool)
    mask[2, 7] = True  # another chunk that holds question 2's answer
    return questions, ragged(rng, 10, 16), mask


@pytest.mark.parametrize("n_streams", [1, 2])
def test_packed_retriever_loss_and_gradients_equal_the_padded_ones(streams, n_streams):
    streams(n_streams)
    rng = np.random.default_rng(5)
    mx.random.seed(5)
    retr = tiny_retriever(V)
    batch = contrastive_batch(rng)
    packed = R.with_packings(batch, cores.spreads())
    assert len(packed) == 6 and len(packed[4]) == len(packed[5]) == n_streams
    np.testing.assert_array_equal(packed[3], np.arange(6))  # the default target made explicit
    assert_same(loss_and_grads(retr, R.contrastive_loss, packed), loss_and_grads(retr, R.contrastive_loss, batch))
    # rows without padding get no plan, and the loss takes them as they are
    full = contrastive_batch(rng, full_questions=True)
    packed = R.with_packings((*full, np.arange(6)[::-1].copy()), cores.spreads())
    assert packed[4] == [] and len(packed[5]) == n_streams
    np.testing.assert_array_equal(packed[3], np.arange(6)[::-1])  # a given target (sharded batches) is kept
    assert_same(loss_and_grads(retr, R.contrastive_loss, packed), loss_and_grads(retr, R.contrastive_loss, packed[:4]))


@pytest.mark.parametrize("kind", ["generator", "retriever"])
def test_compiled_packed_steps_follow_the_padded_ones(streams, kind):
    """Through `mx.compile` (a new trace per packed length, and per plan present or not) the losses and weights
    stay those of padded steps."""
    streams(2)
    rng = np.random.default_rng(3)
    if kind == "generator":
        batches = [fid_batch(rng) for _ in range(4)]
        make, loss_fn, with_packings = tiny_generator, G.seq2seq_loss, G.with_packings
    else:
        batches = [contrastive_batch(rng, full_questions=i == 2) for i in range(4)]
        make, loss_fn, with_packings = tiny_retriever, R.contrastive_loss, R.with_packings
    runs = []
    for pack in (False, True):
        mx.random.seed(0)
        model = make(V)
        cfg = T.TrainConfig(batch_size=5, num_iters=4, lr_warmup=0)
        optimizer = T.make_optimizer(cfg)
        step = T.build_step(model, optimizer, loss_fn, cfg.grad_clip, compile=True)
        losses = []
        for batch in batches:
            batch = with_packings(batch, cores.spreads()) if pack else batch
            with cores.spread():
                loss, _ = step(*T.batch_to_mx(batch))
                mx.eval(loss, model.state, optimizer.state)
            losses.append(loss.item())
        runs.append((losses, dict(tree_flatten(model.parameters()))))
    (l0, w0), (l1, w1) = runs
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    assert l1[-1] < l1[0]
    for k in w0:
        np.testing.assert_allclose(w1[k], w0[k], atol=1e-5, err_msg=k)


def test_host_embedding_and_generation_pack_and_match_the_padded_model(streams):
    streams(2)
    rng = np.random.default_rng(4)
    retr = tiny_retriever(V)
    chunks = ragged(rng, 9, 16)
    with cores.spread():
        plain = retr(mx.array(chunks))
    np.testing.assert_allclose(retr.embed_rows(chunks), plain, atol=1e-5)
    gen = tiny_generator(V)
    passages = mx.array(fid_batch(rng)[0])
    memory, plain = gen.encode_spread(passages), gen.encode(passages)
    real = np.array(plain.mask).reshape(len(passages), -1) == 0
    np.testing.assert_allclose(np.array(memory.states)[real], np.array(plain.states)[real], atol=1e-5)
    cached = np.array(mx.stack(list(gen.generate(passages, max_tokens=5)), axis=1)).tolist()
    assert cached == gen.generate_recompute(passages, 5)
