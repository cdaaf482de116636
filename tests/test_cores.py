"""cores.py: rows spread over CPU streams give the unspread results, and the BLAS thread count comes back."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from functools import partial
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from helpers import build_builtin, tiny_generator, tiny_retriever

import cores  # noqa: E402
import jit  # noqa: E402
import generator as G  # noqa: E402
import retriever as R  # noqa: E402
import training as T  # noqa: E402


@pytest.fixture
def spread_calls(monkeypatch) -> list[bool]:
    """Record, for every `cores.map_rows` call, whether it ran inside `spread()` (`monkeypatch.undo()` stops it)."""
    calls = []
    original_map_rows = cores.map_rows

    def recording_map_rows(fn, *arrays):
        calls.append(cores._State.active)
        return original_map_rows(fn, *arrays)

    monkeypatch.setattr(cores, "map_rows", recording_map_rows)
    return calls


class Pair(NamedTuple):
    a: mx.array
    b: mx.array


def test_map_rows_splits_over_distinct_streams_and_concatenates_in_order(streams):
    streams(3)
    x = mx.arange(14).reshape(7, 2)
    seen = []

    def fn(rows):
        seen.append((mx.default_stream(mx.cpu), rows.shape[0]))
        return Pair(rows * 2, rows.sum(axis=1))

    cores.map_rows(fn, x)  # outside spread: one call with every row
    assert [n for _, n in seen] == [7]
    seen.clear()
    with cores.spread():
        out = cores.map_rows(fn, x)
    assert [n for _, n in seen] == [2, 2, 3]
    assert len({str(s) for s, _ in seen}) == 3 and mx.default_stream(mx.cpu) not in [s for s, _ in seen]
    assert isinstance(out, Pair)
    np.testing.assert_array_equal(out.a, np.arange(14).reshape(7, 2) * 2)
    np.testing.assert_array_equal(out.b, np.arange(14).reshape(7, 2).sum(axis=1))
    with cores.spread():
        plain = cores.map_rows(lambda r: (r + 1, r[:, :1]), x)  # a plain tuple, and fewer rows than streams
        few = cores.map_rows(lambda r: r + 1, x[:2])
    assert isinstance(plain, tuple) and plain[1].shape == (7, 1)
    np.testing.assert_array_equal(few, np.array(x[:2]) + 1)
    with cores.spread():  # a NamedTuple of arrays as an input is split field by field
        pairs = cores.map_rows(lambda p, r: p.a + p.b[:, None] + r, Pair(x, x[:, 0]), x)
    np.testing.assert_array_equal(pairs, np.array(x) * 2 + np.array(x[:, :1]))


def test_per_part_values_go_to_their_slice_as_planned_on_the_host(streams):
    streams(3)
    x = mx.arange(7)[:, None]
    slices = cores.spread_row_slices(7)
    assert slices == [slice(0, 2), slice(2, 4), slice(4, 7)]
    assert cores.spread_row_slices(7, spreading=False) == [slice(0, 7)]
    assert cores.spread_row_slices(0, spreading=True) == [slice(0, 0)]  # no rows: one empty slice, not a crash
    with cores.spread():
        assert [rows for _, rows in cores.row_parts(7)] == slices  # the plan is the split
        out = cores.map_rows(lambda r, v: r * 0 + v, x, cores.PerPart([10, 20, 30]))
        nones = cores.map_rows(lambda r, v: r + (v is None), x, cores.PerPart(None))
        with pytest.raises(ValueError, match="2 per-part values for 3 row slices"):
            cores.map_rows(lambda r, v: r, x, cores.PerPart([1, 2]))
    assert np.array(out).ravel().tolist() == [10, 10, 20, 20, 30, 30, 30]
    np.testing.assert_array_equal(nones, np.array(x) + 1)
    assert np.array(cores.map_rows(lambda r, v: r * v, x, cores.PerPart([2]))).ravel().tolist() == list(range(0, 14, 2))


def test_outside_spread_or_with_one_stream_nothing_is_split(streams):
    calls = []

    def fn(rows):
        calls.append(rows.shape[0])
        return rows

    streams(2)
    cores.map_rows(fn, mx.zeros((6, 3)))
    streams(1)
    with cores.spread():
        cores.map_rows(fn, mx.zeros((6, 3)))
    assert calls == [6, 6]


def blas_threads():
    """The BLAS's thread-count getter that cores.spread uses (OpenBLAS, the scipy-openblas32 wheel's, MKL)."""
    functions = cores._blas_threads_functions()
    return functions[0] if functions else None


@pytest.mark.skipif(blas_threads() is None, reason="no BLAS with a thread count in this process")
def test_spread_runs_the_blas_single_threaded_and_restores_it_even_on_error(streams):
    streams(2)
    before = blas_threads()()
    with cores.spread():
        assert blas_threads()() == 1
        with cores.spread():  # nested: still spread, and the outer one restores
            assert blas_threads()() == 1
        assert blas_threads()() == 1
    assert blas_threads()() == before
    with pytest.raises(RuntimeError):
        with cores.spread():
            raise RuntimeError("boom")
    assert blas_threads()() == before


def test_configure_rejects_negative_and_auto_uses_the_cores(streams):
    with pytest.raises(ValueError, match="--cpu_streams"):
        streams(-1)
    assert streams(0) == min(cores.available_cores(), cores.MAX_AUTO_STREAMS)


def loss_and_grads(model, loss_fn, batch, spread: bool):
    with cores.spread() if spread else contextlib.nullcontext():
        (loss, (aux, ntok)), grads = nn.value_and_grad(model, loss_fn)(model, *batch)
        mx.eval(loss, aux, ntok, grads)
    return loss.item(), aux.item(), ntok.item(), grads


def assert_same(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-5) and a[1] == pytest.approx(b[1], abs=1e-6) and a[2] == b[2]
    ga, gb = dict(nn.utils.tree_flatten(a[3])), dict(nn.utils.tree_flatten(b[3]))
    assert ga.keys() == gb.keys()
    for k in ga:
        np.testing.assert_allclose(ga[k], gb[k], atol=2e-5, rtol=1e-3, err_msg=k)


@pytest.mark.parametrize("copy", [True, False])
def test_spread_generator_loss_and_gradients_equal_the_unspread_ones(streams, copy):
    streams(2)
    rng = np.random.default_rng(0)
    model = tiny_generator(64, copy=copy)
    passages = rng.integers(4, 64, size=(5, 3, 12)).astype(np.int32)
    passages[:, :, -3:] = 0
    answers = rng.integers(4, 64, size=(5, 6)).astype(np.int32)
    answers[1, 3:] = 0
    answer_in = np.concatenate([np.full((5, 1), 2, np.int32), answers[:, :-1]], axis=1)
    batch = [mx.array(v) for v in (passages, answer_in, answers)]
    assert_same(loss_and_grads(model, G.seq2seq_loss, batch, True), loss_and_grads(model, G.seq2seq_loss, batch, False))


def test_generation_encodes_spread_then_leaves_spread_for_decoding(streams, spread_calls, monkeypatch):
    streams(2)
    rng = np.random.default_rng(2)
    model = tiny_generator(64)
    passages = mx.array(rng.integers(4, 64, size=(5, 3, 12)).astype(np.int32))
    used = spread_calls
    memory = model.encode_spread(passages)
    monkeypatch.undo()
    assert used == [True] and not cores._State.active  # split inside spread(), which is over once it returns
    plain = model.encode(passages)
    for got, want in zip(memory, plain):
        np.testing.assert_allclose(got, want, atol=1e-5)
    cached = np.array(mx.stack(list(model.generate(passages, max_tokens=6)), axis=1)).tolist()
    assert cached == model.generate_recompute(passages, 6)


def test_spread_decoding_gives_the_unspread_tokens_and_cache_per_slice(streams):
    rng = np.random.default_rng(3)
    model = tiny_generator(64)
    passages = mx.array(rng.integers(4, 64, size=(5, 3, 12)).astype(np.int32))
    streams(1)
    plain = np.array(mx.stack(list(model.generate(passages, max_tokens=6)), axis=1))
    streams(2)
    spread = np.array(mx.stack(list(model.generate(passages, max_tokens=6)), axis=1))
    assert spread.tolist() == plain.tolist()
    assert not cores._State.active  # each step leaves spread() before yielding its tokens
    # spread sampling: top-1 is greedy
    top1 = model.generate(passages, max_tokens=6, temperature=0.7, sample_top_k=1, seed=0)
    assert np.array(mx.stack(list(top1), axis=1)).tolist() == plain.tolist()
    one = np.array(mx.stack(list(model.generate(passages[:1], max_tokens=6)), axis=1))
    assert one.tolist() == plain[:1].tolist()  # a single row: nothing to spread


def test_evaluation_encodes_each_batch_once_for_loss_and_answers(streams, tmp_path, monkeypatch):
    streams(2)
    data = build_builtin(tmp_path / "dataset", corpus_size=30, context_size=32)
    model = tiny_generator(data.vocab_size)
    ids = data.split_indices("train")[:10]
    chunks = np.random.default_rng(4).integers(0, len(data.chunks), size=(10, 2))
    encoded = []
    encode_spread = G.Generator.encode_spread
    monkeypatch.setattr(G.Generator, "encode_spread", lambda m, p: encoded.append(p.shape[0]) or encode_spread(m, p))
    metrics, predictions = G.evaluate_answers(model, data, ids, chunks, batch_size=4)
    assert encoded == [4, 4, 2]
    monkeypatch.undo()
    nll = ntok = 0.0
    for i in range(0, 10, 4):
        answer_in, answer_out = G.teacher_forcing(np.asarray(data.answers[ids[i : i + 4]]))
        passages = G.build_passages(data, data.questions[ids[i : i + 4]], chunks[i : i + 4])
        loss, (_, n) = G.seq2seq_loss(model, *(mx.array(a) for a in (passages, answer_in, answer_out)))
        nll, ntok = nll + loss.item() * n.item(), ntok + n.item()
    assert metrics["valid_loss"] == pytest.approx(nll / ntok, rel=1e-5)
    passages = G.build_passages(data, data.questions[ids], chunks)
    assert predictions == [data.decode(t) for t in G.greedy_answers(model, passages, batch_size=4)]
    assert set(metrics) == {"valid_loss", "em", "f1"}
    only_answers, again = G.evaluate_answers(model, data, ids, chunks, batch_size=4, loss=False)
    assert set(only_answers) == {"em", "f1"} and again == predictions


def test_index_build_embeds_spread_and_stores_what_embed_returns(streams, spread_calls, tmp_path, monkeypatch):
    import index as chunk_index

    streams(2)
    model = tiny_retriever(64, embedding_dim=16)
    chunks = np.random.default_rng(5).integers(4, 64, size=(300, 12)).astype(np.int32)
    chunk_index.write_shard(model, chunks, tmp_path / "shard.npy", batch_size=128)
    assert spread_calls == [True, True, True]  # every batch spread over the streams
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(tmp_path / "shard.npy"), np.array(chunk_index.embed(model, chunks, 128)))


def test_spread_retriever_loss_and_gradients_equal_the_unspread_ones(streams):
    streams(3)
    rng = np.random.default_rng(1)
    model = tiny_retriever(64, embedding_dim=16)
    questions = rng.integers(4, 64, size=(4, 8)).astype(np.int32)
    chunks = rng.integers(4, 64, size=(8, 12)).astype(np.int32)
    chunks[2, 6:] = 0
    mask = np.eye(4, 8, dtype=bool)
    batch = [mx.array(v) for v in (questions, chunks, mask)]
    got = loss_and_grads(model, R.contrastive_loss, batch, True)
    assert_same(got, loss_and_grads(model, R.contrastive_loss, batch, False))


def record_loss(losses: list, line: str) -> None:
    if "loss " in line:
        losses.append(float(line.split("loss ")[1].split()[0]))


def test_training_with_spread_steps_follows_the_unspread_run(streams, tmp_path):
    data = build_builtin(tmp_path / "dataset", corpus_size=30, context_size=32)
    train_ids = data.split_indices("train", answerable=True)
    retrieved = np.stack([[int(data.positives(int(q))[0]), 0] for q in train_ids])
    losses = {}
    for n in (1, 2):
        streams(n)
        cfg = T.TrainConfig(batch_size=8, num_iters=8, lr_warmup=2, learning_rate=3e-3, steps_per_report=1)
        model = tiny_generator(data.vocab_size, max_answer_tokens=int(data.answers.shape[1]))
        seen = losses.setdefault(n, [])
        T.fit(
            model,
            T.make_optimizer(cfg),
            cfg,
            G.seq2seq_loss,
            G.FiDBatches(data, train_ids, retrieved, 8, seed=0),
            0,
            lambda step: {},
            lambda s, m: None,
            "tok_acc",
            log=partial(record_loss, seen),
            compile=False,
        )
    assert len(losses[1]) == 8 and losses[1][-1] < losses[1][0]
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-3)


@pytest.mark.parametrize("value", ["", "0", "1"])
def test_mlx_disable_compile_set_to_anything_keeps_compiling_off(monkeypatch, value):
    """MLX turns compiling off when the variable exists, whatever its value; setting the compile mode would turn it
    back on (an empty value passed for unset)."""
    monkeypatch.setenv("MLX_DISABLE_COMPILE", value)
    monkeypatch.setattr(cores, "set_compile_mode", lambda mode: pytest.fail("compiling turned back on"))
    assert cores.keep_streams_apart_in_compile.__wrapped__() is False


_KERNELS_SCRIPT = """
import sys
import mlx.core as mx
import cores
cores.configure(2)
if sys.argv[1] == "mlx_default":  # MLX's own mode, which merges the streams' constants
    cores.set_compile_mode(cores.ENABLED)
step = mx.compile(lambda x: cores.map_rows(lambda rows: mx.maximum(rows * 0.5 + 1.0, 0.0), x))
with cores.spread():
    mx.eval(step(mx.ones((8, 64))))
"""


@pytest.mark.skipif(not jit.compiler_available(), reason="mx.compile on the CPU needs g++")
def test_spread_compiled_kernels_keep_their_constants_on_every_stream(tmp_path):
    """With MLX's merge, the second stream's kernel reads the constants as full-size inputs (a strided kernel);
    `configure` keeps them as constants, so every stream's kernel is the contiguous one (MLX writes each kernel's
    source under $TMPDIR/mlx/<version>/cpu/, named after its layout)."""
    assert cores.keep_streams_apart_in_compile()
    kernels = {}
    for mode in ("configured", "mlx_default"):
        tmp = tmp_path / mode
        tmp.mkdir()
        env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=os.pathsep.join(sys.path))
        subprocess.run([sys.executable, "-c", _KERNELS_SCRIPT, mode], env=env, check=True, timeout=120)
        kernels[mode] = sorted(p.stem for p in tmp.glob("mlx/*/cpu/*.cpp"))
    assert kernels["configured"] and all(name.endswith("_contiguous") for name in kernels["configured"])
    if not any("_strided_" in name for name in kernels["mlx_default"]):
        pytest.skip("this MLX no longer merges constants across streams: the no_simplify mode is not needed")
