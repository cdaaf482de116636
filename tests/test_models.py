"""The two models on tiny configs: shapes, padding, the key/value cache, sampling, Fusion-in-Decoder, losses."""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten
import numpy as np
import pytest

from helpers import tiny_generator, tiny_retriever

import generator as G  # noqa: E402
import retriever as R  # noqa: E402
from datasets import BOS_ID, EOS_ID, PAD_ID  # noqa: E402

V = 300


def rand_tokens(rng, shape, lengths=None) -> np.ndarray:
    """Random non-special token ids; with `lengths`, each row is PAD after its length."""
    t = rng.integers(4, V, size=shape).astype(np.int32)
    if lengths is not None:
        for i, n in enumerate(lengths):
            t[i, n:] = PAD_ID
    return t


def passages(seed: int = 0, B: int = 2, P: int = 3, L: int = 10) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rand_tokens(rng, (B, P, L))
    p[:, :, -2:] = PAD_ID  # passages are PAD-filled at the end
    p[0, 1, 5:] = PAD_ID
    return p


# ------------------------------------------------------------------ retriever


def test_retriever_shapes_and_unit_norm():
    model = tiny_retriever(V)
    rng = np.random.default_rng(0)
    e = model(mx.array(rand_tokens(rng, (5, 12), lengths=[12, 7, 3, 1, 9])))
    assert e.shape == (5, 16)
    assert e.dtype == mx.float32
    assert np.allclose(np.linalg.norm(np.array(e), axis=1), 1.0, atol=1e-5)


def test_retriever_padding_and_batch_invariance():
    model = tiny_retriever(V)
    q = np.random.default_rng(1).integers(4, V, size=6).astype(np.int32)
    w8 = np.zeros((1, 8), np.int32)
    w8[0, :6] = q
    w16 = np.zeros((1, 16), np.int32)
    w16[0, :6] = q
    e8, e16 = np.array(model(mx.array(w8))), np.array(model(mx.array(w16)))
    assert np.allclose(e8, e16, atol=1e-6)
    # the same row inside a batch of other lengths
    batch = np.zeros((3, 16), np.int32)
    batch[0, :15] = np.random.default_rng(2).integers(4, V, size=15)
    batch[1, :6] = q
    batch[2, :2] = [7, 9]
    assert np.allclose(np.array(model(mx.array(batch)))[1], e16[0], atol=1e-6)
    # and a different question gets a different embedding
    other = w16.copy()
    other[0, 2] = 4 if other[0, 2] != 4 else 5
    assert not np.allclose(np.array(model(mx.array(other))), e16, atol=1e-4)


def test_contrastive_loss_ignores_masked_columns():
    model = tiny_retriever(V)
    rng = np.random.default_rng(3)
    q = mx.array(rand_tokens(rng, (3, 8)))
    c = rand_tokens(rng, (4, 10))
    base_mask = np.zeros((3, 3), bool)
    loss3, _ = R.contrastive_loss(model, q, mx.array(c[:3]), mx.array(base_mask))
    # a fourth column marked as "also holds the answer" for every row is not a negative for anyone
    mask4 = np.zeros((3, 4), bool)
    mask4[:, 3] = True
    loss4, _ = R.contrastive_loss(model, q, mx.array(c), mx.array(mask4))
    assert abs(loss3.item() - loss4.item()) < 1e-5
    # unmasked, it is a negative and the loss grows
    loss4n, _ = R.contrastive_loss(model, q, mx.array(c), mx.array(np.zeros((3, 4), bool)))
    assert loss4n.item() > loss3.item()
    # every other column masked: only the positive is left, so the loss is zero and every row is right
    loss, (acc, ntok) = R.contrastive_loss(model, q, mx.array(c[:3]), mx.array(np.ones((3, 3), bool)))
    assert loss.item() < 1e-5 and acc.item() == 1.0
    assert ntok.item() == 3 * 8 + 3 * 10


# ------------------------------------------------------------------ generator


@pytest.mark.parametrize("copy", [True, False])
def test_generator_shapes_and_distribution(copy):
    model = tiny_generator(V, copy=copy)
    p = mx.array(passages())
    memory = model.encode(p)
    assert memory.states.shape == (2, 3 * 10, 32)
    assert memory.tokens.shape == (2, 30)
    answer_in = mx.array(np.array([[BOS_ID, 5, 6, 7], [BOS_ID, 8, 0, 0]], np.int32))
    logp = model(p, answer_in)
    assert logp.shape == (2, 4, V)
    # log-probabilities: each position is a distribution over the vocabulary
    assert np.allclose(np.exp(np.array(logp)).sum(-1), 1.0, atol=1e-4)


def test_copy_pointer_only_puts_mass_on_passage_tokens():
    model = tiny_generator(V, copy=True)
    model.pointer.gate.bias = mx.array([30.0])  # gate ~ 1: copy only
    p = passages()
    probs = np.exp(np.array(model(mx.array(p), mx.array([[BOS_ID, 9], [BOS_ID, 11]], dtype=mx.int32))))
    for b in range(2):
        present = set(p[b].ravel().tolist()) - {PAD_ID}
        on_passage = probs[b][:, sorted(present)].sum(-1)
        assert np.allclose(on_passage, 1.0, atol=1e-4)
        assert probs[b][:, PAD_ID].max() < 1e-6


def test_decoder_is_causal_and_pad_targets_are_ignored():
    model = tiny_generator(V)
    p = mx.array(passages())
    a_in = np.array([[BOS_ID, 5, 6], [BOS_ID, 8, 9]], np.int32)
    a_out = np.array([[5, 6, EOS_ID], [8, 9, EOS_ID]], np.int32)
    longer_in = np.concatenate([a_in, [[PAD_ID, PAD_ID], [77, 78]]], axis=1)
    longer_out = np.concatenate([a_out, np.zeros((2, 2), np.int32)], axis=1)
    short = np.array(model(p, mx.array(a_in)))
    long = np.array(model(p, mx.array(longer_in)))
    assert np.allclose(long[:, :3], short, atol=1e-5)  # later inputs never change earlier positions
    l1, (_, n1) = G.seq2seq_loss(model, p, mx.array(a_in), mx.array(a_out))
    l2, (_, n2) = G.seq2seq_loss(model, p, mx.array(longer_in), mx.array(longer_out))
    assert n1.item() == n2.item() == 6
    assert abs(l1.item() - l2.item()) < 1e-5


def test_folded_cross_attention_and_pointer_are_the_projected_ones():
    """Without a cache, the cross-attention folds the memory's key/value projections into its queries and outputs
    (and the pointer its key projection): same outputs and gradients as projecting the memory (the cached path)."""
    import mlx.nn as nn
    from layers import CrossAttention, padding_mask

    rng = np.random.default_rng(11)
    mx.random.seed(11)
    att = CrossAttention(32, 4)
    x = mx.array(rng.standard_normal((3, 5, 32)).astype(np.float32))
    memory = mx.array(rng.standard_normal((3, 11, 32)).astype(np.float32))
    valid = rng.random((3, 11)) < 0.7
    valid[:, 0] = True
    mask = padding_mask(mx.array(valid))
    weights = mx.array(rng.standard_normal((3, 5, 32)).astype(np.float32))

    def loss(model, x, memory, cached):
        return (model(x, memory, mask, {} if cached else None) * weights).sum()

    grads = {}
    for cached in (False, True):
        out = loss(att, x, memory, cached)
        g_params = nn.value_and_grad(att, loss)(att, x, memory, cached)[1]
        g_inputs = mx.grad(lambda x, m, c=cached: loss(att, x, m, c), argnums=(0, 1))(x, memory)
        grads[cached] = (out, tree_flatten(g_params), g_inputs)
    (a, pa, ia), (b, pb, ib) = grads[False], grads[True]
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5)
    for (name, ga), (_, gb) in zip(pa, pb):
        np.testing.assert_allclose(np.array(ga), np.array(gb), atol=1e-4, err_msg=name)
    for ga, gb in zip(ia, ib):
        np.testing.assert_allclose(np.array(ga), np.array(gb), atol=1e-4)
    assert np.abs(np.array(ib[1])[~valid]).max() < 1e-30  # masked memory positions: no gradient (e^-87 ~ 0)

    model = tiny_generator(V)
    memory = model.encode(mx.array(passages(seed=12)))
    h = mx.random.normal((2, 3, model.args.dim))
    folded, _ = model.pointer(h, memory)
    projected, _ = model.pointer(h, memory, {})
    np.testing.assert_allclose(np.array(folded), np.array(projected), atol=1e-6)


def test_self_attention_cache_grows_and_keeps_every_position():
    from layers import append_to_cache

    rng = np.random.default_rng(4)
    cache, keys, values = {}, [], []
    for length in (1, 5, 1, 12, 1, 20, 1):  # crosses the first buffer (16) and its regrowths
        k, v = (mx.array(rng.standard_normal((2, 3, length, 4)).astype(np.float32)) for _ in range(2))
        keys.append(k)
        values.append(v)
        got_k, got_v = append_to_cache(cache, k, v)
        assert cache["length"] == sum(x.shape[2] for x in keys) == got_k.shape[2]
        assert np.array_equal(np.array(got_k), np.array(mx.concatenate(keys, axis=2)))
        assert np.array_equal(np.array(got_v), np.array(mx.concatenate(values, axis=2)))


@pytest.mark.parametrize("copy", [True, False])
def test_kv_cache_greedy_equals_recompute(copy):
    model = tiny_generator(V, copy=copy, max_answer_tokens=20)
    p = mx.array(passages(seed=4))
    cached = np.stack([np.array(t) for t in model.generate(p, 20)], axis=1).tolist()  # past the cache's first 16
    assert cached == model.generate_recompute(p, 20)
    assert len(cached[0]) == 20


@pytest.mark.parametrize("copy", [True, False])
def test_cached_logits_equal_full_recompute(copy):
    model = tiny_generator(V, copy=copy)
    p = mx.array(passages(seed=5))
    memory = model.encode(p)
    seq = mx.array(np.concatenate([np.full((2, 1), BOS_ID), rand_tokens(np.random.default_rng(6), (2, 7))], 1))
    full = np.array(model.decode(seq, memory))
    # prefill 3 tokens, then a block of 2 (causal mask with an offset), then one token at a time
    cache = model.make_cache()
    pieces = [model.decode(seq[:, :3], memory, cache), model.decode(seq[:, 3:5], memory, cache)]
    pieces += [model.decode(seq[:, t : t + 1], memory, cache) for t in range(5, 8)]
    stepwise = np.concatenate([np.array(x) for x in pieces], axis=1)
    assert stepwise.shape == full.shape
    assert np.abs(stepwise - full).max() < 1e-4
    last = np.array(model.decode(seq, memory, log=False, last=True))  # the head on the last position only
    assert last.shape == (2, 1, V)
    np.testing.assert_allclose(np.log(last + 1e-9), full[:, -1:], atol=1e-4)


def test_generate_takes_max_tokens_as_given_and_an_empty_batch_has_no_steps():
    model = tiny_generator(V)  # max_answer_tokens 8
    p = mx.array(passages(seed=10))
    assert len(list(model.generate(p))) == 8 and len(list(model.generate(p, 3))) == 3
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        list(model.generate(p, 0))  # was the model's 8 tokens: `0 or 8`
    empty = mx.zeros((0, 3, 10), dtype=mx.int32)  # no questions: encoded (0 rows), nothing decoded
    assert model.encode(empty).states.shape == (0, 30, model.args.dim)
    assert list(model.generate(empty, 4)) == []


def test_top_k_sampling_keeps_exactly_k_tokens_when_scores_tie():
    """Four tokens tie for the best score: top_k=1 must still draw one token (the same one every time), and
    top_k=2 only two of them; a cut by value kept all four."""
    logits = mx.array([[5.0, 1.0, 5.0, 5.0, 0.0, 5.0]] * 64)
    one = {int(t) for t in np.array(G.sample_tokens(logits, 1, mx.random.key(0)))}
    two = {int(t) for t in np.array(G.sample_tokens(logits, 2, mx.random.key(1)))}
    assert len(one) == 1 and one <= {0, 2, 3, 5}
    assert len(two) == 2 and two <= {0, 2, 3, 5}
    every = {int(t) for t in np.array(G.sample_tokens(logits, 0, mx.random.key(2)))}
    assert {0, 2, 3, 5} <= every


def test_sampling_top_k_one_is_greedy_and_seeded_sampling_reproduces():
    model = tiny_generator(V, copy=False)
    p = mx.array(passages(seed=7))

    def run(**kw):
        return np.stack([np.array(t) for t in model.generate(p, 8, **kw)], axis=1)

    greedy = run()
    assert np.array_equal(run(temperature=0.7, sample_top_k=1, seed=3), greedy)
    mx.random.seed(1)
    a = run(temperature=1.5, seed=11)
    mx.random.seed(2)  # the global generator must not matter when a seed is given
    b = run(temperature=1.5, seed=11)
    assert np.array_equal(a, b)
    c = run(temperature=1.5, seed=12)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, greedy)  # a hot temperature over ~300 tokens does not pick the argmax 16 times


def test_fid_reads_every_passage_and_rows_are_independent():
    model = tiny_generator(V)
    base = passages(seed=8)
    a_in = mx.array(np.array([[BOS_ID, 5, 6], [BOS_ID, 7, 8]], np.int32))
    ref = np.array(model(mx.array(base), a_in))
    for k in range(base.shape[1]):
        changed = base.copy()
        changed[0, k, 1] = 4 if changed[0, k, 1] != 4 else 5  # one token of passage k of question 0
        out = np.array(model(mx.array(changed), a_in))
        assert np.abs(out[0] - ref[0]).max() > 1e-4, f"passage {k} is not read"
        assert np.allclose(out[1], ref[1], atol=1e-5), "question 1 must not see question 0's passages"


def test_model_args_validation():
    for cls in (R.ModelArgs, G.ModelArgs):
        with pytest.raises(ValueError, match="--dim 30"):
            cls(vocab_size=V, dim=30, num_heads=4)  # not a multiple of the heads
        with pytest.raises(ValueError, match="--dim 30"):
            cls(vocab_size=V, dim=30, num_heads=2)  # head size 15: RoPE needs an even one
        with pytest.raises(ValueError, match="positive"):
            cls(vocab_size=V, dim=32, num_heads=0)
        cls(vocab_size=V, dim=32, num_heads=4)


# ------------------------------------------------------------------ batching helpers


def test_teacher_forcing_hand_example():
    answers = np.array([[5, 6, EOS_ID, PAD_ID], [7, EOS_ID, PAD_ID, PAD_ID]], np.int32)
    a_in, a_out = G.teacher_forcing(answers)
    assert a_in.tolist() == [[BOS_ID, 5, 6, PAD_ID, PAD_ID], [BOS_ID, 7, PAD_ID, PAD_ID, PAD_ID]]
    assert a_out.tolist() == [[5, 6, EOS_ID, PAD_ID, PAD_ID], [7, EOS_ID, PAD_ID, PAD_ID, PAD_ID]]


def test_trim_answers_drops_only_all_pad_columns_and_keeps_loss_and_gradients():
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    answers = np.array([[5, 6, EOS_ID, PAD_ID, PAD_ID, PAD_ID], [7, EOS_ID] + [PAD_ID] * 4], np.int32)
    a_in, a_out = G.teacher_forcing(answers)  # width 7, 3 columns used
    assert [G.trim_answers(a_in, a_out, m)[1].shape[1] for m in (1, 2, 4, 8)] == [3, 4, 4, 7]
    t_in, t_out = G.trim_answers(a_in, a_out, 1)
    assert t_in.tolist() == a_in[:, :3].tolist() and t_out.tolist() == a_out[:, :3].tolist()
    model, p = tiny_generator(V), mx.array(passages(seed=3))
    loss_and_grad = nn.value_and_grad(model, G.seq2seq_loss)
    (full, (_, n_full)), g_full = loss_and_grad(model, p, mx.array(a_in), mx.array(a_out))
    (trim, (_, n_trim)), g_trim = loss_and_grad(model, p, mx.array(t_in), mx.array(t_out))
    assert n_full.item() == n_trim.item() == 5 and abs(full.item() - trim.item()) < 1e-6
    for (k, a), (_, b) in zip(tree_flatten(g_full), tree_flatten(g_trim)):
        assert np.allclose(np.array(a), np.array(b), atol=1e-6), k


def test_build_passages_layout():
    class Data:
        chunks = np.arange(4 * 5, dtype=np.int32).reshape(4, 5) + 100

    questions = np.array([[10, 11, 0], [12, 0, 0]], np.int32)
    out = G.build_passages(Data, questions, np.array([[3, 0], [1, 1]]))
    assert out.shape == (2, 2, 3 + 1 + 5)
    assert out[0, 0].tolist() == [10, 11, 0, EOS_ID, 115, 116, 117, 118, 119]
    assert out[0, 1].tolist() == [10, 11, 0, EOS_ID, 100, 101, 102, 103, 104]
    assert out[1, 1].tolist() == [12, 0, 0, EOS_ID, 105, 106, 107, 108, 109]


def test_greedy_answers_stop_each_row_at_eos():
    steps = [[5, 9, 6], [EOS_ID, 9, 7], [8, EOS_ID, 7], [8, 8, EOS_ID], [8, 8, 8]]
    consumed = []

    class Fake:
        def generate(self, batch, max_tokens):
            for s in steps:
                consumed.append(s)
                yield mx.array(s[: batch.shape[0]])

    out = G.greedy_answers(Fake(), np.zeros((3, 1, 4), np.int32))
    assert out == [[5], [9, 9], [6, 7, 7]]
    assert len(consumed) == 4, "decoding stops once every row has produced EOS"


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(9)
    q, c = mx.array(rand_tokens(rng, (4, 8))), mx.array(rand_tokens(rng, (4, 10)))
    mask = mx.array(np.zeros((4, 4), bool))
    p = mx.array(passages(seed=9))
    a_in = mx.array(np.array([[BOS_ID, 5, 6], [BOS_ID, 7, 8]], np.int32))
    a_out = mx.array(np.array([[5, 6, EOS_ID], [7, 8, EOS_ID]], np.int32))
    results = []
    for flag in (False, True):
        retr, gen = tiny_retriever(V, checkpoint=flag), tiny_generator(V, checkpoint=flag)
        (l1, _), g1 = nn.value_and_grad(retr, R.contrastive_loss)(retr, q, c, mask)
        (l2, _), g2 = nn.value_and_grad(gen, G.seq2seq_loss)(gen, p, a_in, a_out)
        results.append((l1.item(), l2.item(), {k: np.array(v) for k, v in tree_flatten([g1, g2])}))
    (a1, a2, ga), (b1, b2, gb) = results
    assert abs(a1 - b1) < 1e-6 and abs(a2 - b2) < 1e-6
    assert sorted(ga) == sorted(gb)
    for k in ga:
        assert np.allclose(ga[k], gb[k], atol=1e-6), k
