"""The shared training loop: save/load, exact resume, resume guards, learning on a tiny corpus, Ctrl+C."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from helpers import build_builtin, quiet, tiny_generator, tiny_retriever, weights_numpy

import generator as G  # noqa: E402
import index as chunk_index  # noqa: E402
import retriever as R  # noqa: E402
import training as T  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 built-in documents in 32-token chunks (read only)."""
    return build_builtin(tmp_path_factory.mktemp("train") / "dataset", corpus_size=40, context_size=32)


def no_eval(step: int) -> dict:
    return {}


def flat_optimizer(optimizer) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(optimizer.state)}


def new_retriever_run(data, cfg):
    model = tiny_retriever(data.vocab_size, seed=0, embedding_dim=32)
    optimizer = T.make_optimizer(cfg)
    T.restore_optimizer(optimizer, model, {})
    return model, optimizer


def load_retriever_run(data, directory, cfg, overrides=None):
    model, found = T.load_or_init(
        directory,
        "retriever",
        R.Retriever,
        R.ModelArgs,
        {"vocab_size": data.vocab_size},
        overrides or {},
        data.tokenizer_sha1,
        log=quiet,
    )
    optimizer = T.make_optimizer(cfg)
    T.restore_optimizer(optimizer, model, found.optimizer_state)
    return model, optimizer, found


def save_retriever(data, directory, model, optimizer, step, cfg) -> str:
    return T.save_state(
        directory, "retriever", model, optimizer, step, cfg, {}, {"tokenizer_sha1": data.tokenizer_sha1}, None
    )


# ------------------------------------------------------------------ checkpoints through training.py


def test_save_state_load_or_init_round_trip_is_bit_exact(data, tmp_path):
    cfg = T.TrainConfig(batch_size=8, num_iters=3, lr_warmup=1, steps_per_report=1, steps_per_eval=100)
    model, optimizer = new_retriever_run(data, cfg)
    batches = R.ContrastiveBatches(data, data.split_indices("train", answerable=True), 8, 4, seed=0)
    T.fit(model, optimizer, cfg, R.contrastive_loss, batches, 0, no_eval, lambda s, m: None, log=quiet, compile=False)
    cid = save_retriever(data, tmp_path, model, optimizer, 3, cfg)

    loaded, optimizer2, found = load_retriever_run(data, tmp_path, cfg)
    assert found.id == cid and found.metadata["step"] == 3
    assert found.metadata["model"] == model.args.to_dict()
    assert found.metadata["train"]["num_iters"] == 3
    want, got = weights_numpy(model), weights_numpy(loaded)
    assert sorted(want) == sorted(got)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    want_opt, got_opt = flat_optimizer(optimizer), flat_optimizer(optimizer2)
    assert sorted(want_opt) == sorted(got_opt) and "step" in want_opt
    for k in want_opt:
        assert np.array_equal(got_opt[k], want_opt[k]), k
    assert int(got_opt["step"]) == 3


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_earlier_ones(data, tmp_path, monkeypatch):
    """A full disk at a save is a CheckpointError naming the folder and step (main.py: one line, exit 2), and the
    checkpoints saved before it stay as they were."""
    cfg = T.TrainConfig(batch_size=8, num_iters=3, lr_warmup=1, steps_per_report=1, steps_per_eval=100)
    model, optimizer = new_retriever_run(data, cfg)
    first = save_retriever(data, tmp_path, model, optimizer, 1, cfg)

    def full(*_args, **_kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(T.ckpt, "save_checkpoint", full)
    with pytest.raises(T.ckpt.CheckpointError, match="cannot save the retriever checkpoint of step 2 .No space left"):
        save_retriever(data, tmp_path, model, optimizer, 2, cfg)
    monkeypatch.undo()
    assert load_retriever_run(data, tmp_path, cfg)[2].id == first


def test_resuming_with_another_seed_says_the_batches_differ(data, tmp_path):
    cfg = T.TrainConfig(batch_size=8, num_iters=3, lr_warmup=1, steps_per_report=1, steps_per_eval=100, seed=3)
    model, optimizer = new_retriever_run(data, cfg)
    save_retriever(data, tmp_path, model, optimizer, 3, cfg)
    found = load_retriever_run(data, tmp_path, cfg)[2]
    assert T.seed_change(found, cfg) is None
    other = T.TrainConfig.merged(found.metadata["train"], {"seed": 0})
    assert "trained with --seed 3 and resumes with --seed 0" in T.seed_change(found, other)
    assert T.seed_change(None, other) is None  # a fresh start


class Crash(Exception):
    """Stands for the process dying right after a checkpoint was written."""


@pytest.mark.parametrize("compile", [False, True])
def test_resume_continues_exactly_like_an_uninterrupted_run(data, tmp_path, compile):
    N = 12
    cfg = T.TrainConfig(
        batch_size=8, num_iters=N, lr_warmup=3, learning_rate=3e-3, steps_per_report=1, steps_per_eval=1
    )
    batches = R.ContrastiveBatches(data, data.split_indices("train", answerable=True), 8, 8, seed=0)

    def run(model, optimizer, start, directory=None, crash_at=None):
        losses = {}

        def save(step, metrics):
            losses[step] = metrics["train_loss"]  # steps_per_report=1: this step's loss, full precision
            if step == crash_at:
                save_retriever(data, directory, model, optimizer, step, cfg)
                raise Crash

        try:
            T.fit(model, optimizer, cfg, R.contrastive_loss, batches, start, no_eval, save, log=quiet, compile=compile)
        except Crash:
            pass
        return losses

    model, optimizer = new_retriever_run(data, cfg)
    straight = run(model, optimizer, 0)
    assert sorted(straight) == list(range(1, N + 1))

    first, opt1 = new_retriever_run(data, cfg)
    before = run(first, opt1, 0, tmp_path, crash_at=N // 2)
    assert sorted(before) == list(range(1, N // 2 + 1))
    del first, opt1
    mx.random.seed(1234)  # nothing after the restart may depend on the global generator

    resumed, opt2, found = load_retriever_run(data, tmp_path, cfg)
    assert found.metadata["step"] == N // 2
    after = run(resumed, opt2, found.metadata["step"])
    assert sorted(after) == list(range(N // 2 + 1, N + 1))
    for step in range(1, N + 1):
        got = before[step] if step <= N // 2 else after[step]
        assert abs(got - straight[step]) <= 1e-5, f"step {step}: {got} vs {straight[step]}"
    want, got = weights_numpy(model), weights_numpy(resumed)
    for k in want:
        assert np.abs(got[k] - want[k]).max() <= 1e-5, k
    assert int(flat_optimizer(opt2)["step"]) == N


def test_resume_guards(data, tmp_path):
    cfg = T.TrainConfig(batch_size=8, num_iters=1)
    model, optimizer = new_retriever_run(data, cfg)
    cid = save_retriever(data, tmp_path, model, optimizer, 1, cfg)
    args = (tmp_path, "retriever", R.Retriever, R.ModelArgs, {"vocab_size": data.vocab_size})

    with pytest.raises(T.UsageError, match=r"--dim 64 conflicts with retriever checkpoint " + cid[:12]):
        T.load_or_init(*args, {"dim": 64}, data.tokenizer_sha1, log=quiet)
    with pytest.raises(T.UsageError, match="another tokenizer"):
        T.load_or_init(*args, {}, "0" * 40, log=quiet)
    with pytest.raises(T.UsageError, match="not found"):
        T.load_or_init(*args, {}, data.tokenizer_sha1, identifier="abcdef123", log=quiet)

    # a model config this version cannot build (edited, or from another version): one line naming the file
    meta_path = tmp_path / f"{cid}.retriever.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["bogus_width"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(T.UsageError, match=rf"{cid}.retriever.json: its model config does not fit.*bogus_width"):
        T.load_or_init(*args, {}, data.tokenizer_sha1, log=quiet)
    del meta["model"]["bogus_width"]
    meta_path.write_text(json.dumps(meta))

    # the saved value itself, None (flag not given) and gradient checkpointing are not conflicts
    same, found = T.load_or_init(
        *args, {"dim": 32, "num_heads": None, "checkpoint": True}, data.tokenizer_sha1, log=quiet
    )
    assert found.id == cid and same.args.checkpoint is True
    # --new_model ignores the checkpoint (and so its tokenizer)
    fresh, none = T.load_or_init(*args, {"dim": 64, "num_heads": 4}, "0" * 40, new_model=True, log=quiet)
    assert none is None and fresh.args.dim == 64
    with pytest.raises(T.UsageError, match="--dim 30"):
        T.load_or_init(*args, {"dim": 30, "num_heads": 4}, data.tokenizer_sha1, new_model=True, log=quiet)
    # a checkpoint that exists, named beside --new_model: the conflict is the error, not "not found"
    with pytest.raises(T.UsageError, match=f"--new_model starts a fresh retriever, so it cannot also resume '{cid}'"):
        T.load_or_init(*args, {}, data.tokenizer_sha1, identifier=cid, new_model=True, log=quiet)


def test_train_config_validation_and_merge():
    with pytest.raises(T.UsageError, match="--batch_size"):
        T.TrainConfig(batch_size=0)
    with pytest.raises(T.UsageError, match="--num_iters"):
        T.TrainConfig(num_iters=-1)
    saved = {"batch_size": 8, "num_iters": 50, "learning_rate": 5e-4, "not_a_field": 1}
    cfg = T.TrainConfig.merged(saved, {"num_iters": 80, "learning_rate": None})
    assert (cfg.batch_size, cfg.num_iters, cfg.learning_rate) == (8, 80, 5e-4)
    # the stage's defaults fill what the flags leave out on a fresh start only: a resume keeps its saved config
    defaults = {"batch_size": 32, "num_iters": 400, "learning_rate": 1e-3}
    fresh = T.TrainConfig.merged(None, {"num_iters": 80, "learning_rate": None}, defaults)
    assert (fresh.batch_size, fresh.num_iters, fresh.learning_rate) == (32, 80, 1e-3)
    resumed = T.TrainConfig.merged(saved, {"num_iters": None}, defaults)
    assert (resumed.batch_size, resumed.num_iters, resumed.learning_rate) == (8, 50, 5e-4)


def test_a_fresh_start_beside_a_corrupt_checkpoint_takes_the_stage_defaults(tmp_path):
    """The folder's only checkpoint is corrupt: it is skipped, and the new run is a fresh start with the stage's
    defaults, not a resume's (none) that would leave TrainConfig's own."""
    import pipeline

    data = build_builtin(tmp_path / "dataset", corpus_size=30, context_size=32)
    arch = dict(dim=32, num_blocks=1, num_heads=2, embedding_dim=16)
    flags = dict(batch_size=None, num_iters=2, steps_per_report=1, steps_per_eval=2, lr_warmup=1, seed=0)
    ckdir = tmp_path / "checkpoints"
    R.train(data, ckdir, flags, arch, new_model=True, eval_questions=4, compile=False, log=quiet)
    (weights,) = ckdir.glob("*.retriever.safetensors")
    weights.write_bytes(weights.read_bytes()[:-8])
    before = set(ckdir.glob("*.retriever.json"))
    logs = []
    defaults = dict(pipeline.train_defaults("retriever"), batch_size=6)
    R.train(data, ckdir, flags, arch, train_defaults=defaults, eval_questions=4, compile=False, log=logs.append)
    assert any("skipping corrupt retriever checkpoint" in m for m in logs)
    (new,) = set(ckdir.glob("*.retriever.json")) - before
    assert json.loads(new.read_text())["train"]["batch_size"] == 6, "the stage's default, not TrainConfig's 64"


# ------------------------------------------------------------------ learning


def test_retriever_learns_on_a_tiny_corpus(tmp_path):
    data = build_builtin(tmp_path / "dataset", corpus_size=40, context_size=64)
    train_ids = data.split_indices("train", answerable=True)
    held = np.concatenate([data.split_indices("valid", answerable=True), data.split_indices("test", answerable=True)])
    random_recall = 5 / len(data.chunks)
    cfg = T.TrainConfig(
        batch_size=16, num_iters=60, lr_warmup=5, learning_rate=3e-3, steps_per_report=60, steps_per_eval=1000
    )
    model, optimizer = new_retriever_run(data, cfg)
    before = chunk_index.evaluate(model, data, train_ids)["recall@5"]
    batches = R.ContrastiveBatches(data, train_ids, 16, 0, seed=0)
    T.fit(model, optimizer, cfg, R.contrastive_loss, batches, 0, no_eval, lambda s, m: None, log=quiet, compile=False)
    after = chunk_index.evaluate(model, data, train_ids)
    assert after["recall@5"] >= 5 * random_recall and after["recall@5"] > 0.3
    assert after["recall@5"] > before + 0.3, f"training did not help: {before:.3f} -> {after['recall@5']:.3f}"
    assert after["mrr"] > 0.3
    assert chunk_index.evaluate(model, data, held)["recall@5"] >= 5 * random_recall


def test_generator_training_loss_falls(data):
    train_ids = data.split_indices("train", answerable=True)
    rng = np.random.default_rng(0)
    # two passages per question: a labelled answer chunk and a random one
    retrieved = np.stack([[int(data.positives(int(q))[0]), int(rng.integers(len(data.chunks)))] for q in train_ids])
    cfg = T.TrainConfig(
        batch_size=8, num_iters=30, lr_warmup=3, learning_rate=3e-3, steps_per_report=1, steps_per_eval=1
    )
    model = tiny_generator(data.vocab_size, max_answer_tokens=int(data.answers.shape[1]))
    optimizer = T.make_optimizer(cfg)
    losses = []
    T.fit(
        model,
        optimizer,
        cfg,
        G.seq2seq_loss,
        G.FiDBatches(data, train_ids, retrieved, 8, seed=0),
        0,
        no_eval,
        lambda s, m: losses.append(m["train_loss"]),
        "tok_acc",
        log=quiet,
        compile=False,
    )
    assert len(losses) == 30 and all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.85 * first, f"loss {first:.3f} -> {last:.3f}"


# ------------------------------------------------------------------ Ctrl+C


def interrupt_run(data, make_batch, loss_fn):
    """20 steps that something interrupts; returns (saves as (step, optimizer step), log lines)."""
    cfg = T.TrainConfig(batch_size=8, num_iters=20, lr_warmup=1, steps_per_report=100, steps_per_eval=100)
    model, optimizer = new_retriever_run(data, cfg)
    saves, logs = [], []
    log = logs.append

    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(T.Stopped) as stopped:  # the run ends there: the stages after it must not start
        T.fit(
            model,
            optimizer,
            cfg,
            loss_fn,
            make_batch,
            0,
            no_eval,
            lambda s, m: saves.append((s, int(np.array(optimizer.state["step"])))),
            log=log,
            compile=False,
        )
    assert signal.getsignal(signal.SIGINT) is previous, "the previous SIGINT handler is restored"
    assert saves and stopped.value.args == (saves[-1][0],), "Stopped names the step it saved"
    return saves, logs


def test_sigint_from_the_training_step_stops_after_that_step_and_saves_once(data, capfd):
    batches = R.ContrastiveBatches(data, data.split_indices("train", answerable=True), 8, 4, seed=0)
    calls = []

    def loss_fn(model, *batch):  # uncompiled: runs once per step, on the main thread
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return R.contrastive_loss(model, *batch)

    saves, logs = interrupt_run(data, batches, loss_fn)
    assert saves == [(5, 5)], "one save, after the 5th step, with the optimizer at step 5"
    assert len(calls) == 5
    assert any("stopped at step 5" in m for m in logs)
    assert "interrupt: finishing this step" in capfd.readouterr().err


def test_the_interrupt_handler_does_no_buffered_io(monkeypatch, capfd):
    """The signal can arrive while the loop's own print is blocked writing to a paused terminal or a full pipe;
    printing from the handler then raised "reentrant call" out of the loop, and nothing was saved."""

    class Busy:
        def write(self, _text):
            raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stdout>'>")

        flush = write

    interrupt = T.GracefulInterrupt()
    monkeypatch.setattr(sys, "stdout", Busy())
    monkeypatch.setattr(sys, "stderr", Busy())
    interrupt._handler(signal.SIGINT, None)  # must not raise
    assert interrupt.requested
    assert "interrupt: finishing this step" in capfd.readouterr().err

    class Exited(Exception):
        pass

    def exit_now(code):
        raise Exited(code)

    monkeypatch.setattr(T.os, "_exit", exit_now)
    with pytest.raises(Exited, match="130"):  # the second exits at once, even with stdout busy
        interrupt._handler(signal.SIGINT, None)


def test_a_stop_between_evaluations_saves_no_old_evaluation_as_its_own(data):
    """The checkpoint of a Ctrl+C at step 6 records step 6's training loss, not step 4's evaluation as step 6's."""
    cfg = T.TrainConfig(batch_size=8, num_iters=20, lr_warmup=1, steps_per_report=100, steps_per_eval=4)
    model, optimizer = new_retriever_run(data, cfg)
    batches = R.ContrastiveBatches(data, data.split_indices("train", answerable=True), 8, 4, seed=0)
    calls, saves = [], []

    def loss_fn(model, *batch):
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return R.contrastive_loss(model, *batch)

    def save(step, metrics):
        saves.append((step, dict(metrics)))

    with pytest.raises(T.Stopped):
        T.fit(
            model,
            optimizer,
            cfg,
            loss_fn,
            batches,
            0,
            lambda step: {"recall@5": step / 100},
            save,
            log=quiet,
            compile=False,
        )
    assert [step for step, _ in saves] == [4, 6]
    assert saves[0][1] == {"recall@5": 0.04}  # no report before step 4 (steps_per_report 100)
    assert set(saves[1][1]) == {"train_loss"}, saves[1][1]


def test_sigint_while_preparing_a_batch_stops_training_and_saves_once(data, monkeypatch):
    """make_batch runs one step ahead on a thread, so the signal lands during step k-1 or k: either way the loop
    stops after the step it interrupted and saves exactly that step."""
    batches = R.ContrastiveBatches(data, data.split_indices("train", answerable=True), 8, 4, seed=0)
    k = 6
    handled = threading.Event()
    asked = []

    def make_batch(step):
        asked.append(step)
        if step == k:
            os.kill(os.getpid(), signal.SIGINT)
            assert handled.wait(10), "the handler never ran"
        return batches(step)

    def loss_fn(model, *batch):
        return R.contrastive_loss(model, *batch)

    handler = T.GracefulInterrupt._handler

    def noted(self, signum, frame):
        handler(self, signum, frame)
        handled.set()

    monkeypatch.setattr(T.GracefulInterrupt, "_handler", noted)
    saves, cfg_logs = interrupt_run(data, make_batch, loss_fn)
    assert len(saves) == 1
    step, optimizer_step = saves[0]
    assert step in (k, k + 1) and optimizer_step == step
    assert max(asked) <= step + 1, "no batch is prepared beyond the next one"
    assert any(f"stopped at step {step}" in m for m in cfg_logs)
