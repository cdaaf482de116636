"""The training loop both models share: schedule, compiled step, cadence, Ctrl+C and resume."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

import checkpoint as ckpt
import cores
import distributed as dist


class UsageError(ValueError):
    """Bad input from the user: main.py prints the message on one line and exits with code 2."""


@dataclass
class TrainConfig:
    batch_size: int = 64
    num_iters: int = 1000
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    lr_warmup: int = 100
    grad_clip: float = 1.0
    steps_per_report: int = 50
    steps_per_eval: int = 250
    seed: int = 0
    keep: int = 3

    def __post_init__(self):
        for name in ("batch_size", "num_iters", "steps_per_report", "steps_per_eval", "keep"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.lr_warmup < 0:
            raise UsageError(f"--lr_warmup must be >= 0, got {self.lr_warmup}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):  # nan trains NaN weights and saves them
            raise UsageError(f"--learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UsageError(f"--weight_decay must be a finite number >= 0, got {self.weight_decay}")

    @classmethod
    def merged(cls, saved: dict | None, overrides: dict, defaults: dict | None = None) -> "TrainConfig":
        """A saved config (on resume), else `defaults` (a fresh start), with the command-line values that were
        given on top."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in (saved if saved is not None else defaults or {}).items() if k in fields}
        values.update({k: v for k, v in overrides.items() if k in fields and v is not None})
        return cls(**values)


def seed_change(found, cfg: TrainConfig) -> str | None:
    """A warning when a resumed checkpoint was trained with another --seed than this run's (which decides the
    batches from here on), else None."""
    saved = (found.metadata.get("train") or {}).get("seed") if found is not None else None
    if saved is None or saved == cfg.seed:
        return None
    return (
        f"warning: checkpoint {found.id[:12]} was trained with --seed {saved} and resumes with --seed {cfg.seed}: "
        f"its batches from here on are not that run's (pass --seed {saved} to continue them)"
    )


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    """AdamW with linear warm-up then cosine decay to 10%; the schedule is a function of the optimizer's own
    step counter, which is saved in its state, so a resumed run continues on the same curve."""
    decay = optim.cosine_decay(cfg.learning_rate, max(cfg.num_iters - cfg.lr_warmup, 1), cfg.learning_rate * 0.1)
    if cfg.lr_warmup > 0:
        warmup = optim.linear_schedule(cfg.learning_rate * 0.01, cfg.learning_rate, cfg.lr_warmup)
        schedule = optim.join_schedules([warmup, decay], [cfg.lr_warmup])
    else:
        schedule = decay
    return optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)


RESUME_HINT = "resume by running the same command again"


class Stopped(Exception):
    """Training stopped by a Ctrl+C, its last step saved: the run ends there (main.py exits 130), and the stages
    after it never start from a half-trained model."""


def resume_hint(new_model: bool, identifier: str | None, flag: str) -> str:
    """How to go on after a Ctrl+C, for a run given `--new_model` or a checkpoint id (`flag`)."""
    if new_model:
        return "resume by running the same command without --new_model"
    if identifier is not None:
        return f"resume with {flag} set to the checkpoint saved above (or without {flag}, from the newest)"
    return RESUME_HINT


INTERRUPT_NOTE = b"\ninterrupt: finishing this step, saving, then exiting (Ctrl+C again to exit now)\n"


class GracefulInterrupt:
    """First Ctrl+C asks the loop to stop after the current step (and save); the second exits at once.

    Saves are atomic (temp file + rename), so exiting mid-save never leaves a torn checkpoint."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:  # at once: not even a flush of stdout, which a full pipe or paused terminal would block
            os._exit(130)
        self.requested = True
        # Straight to the file descriptor, never through Python's buffered streams: the signal can arrive while the
        # loop's own print is blocked writing to a paused terminal or a full pipe, and printing from inside that
        # write raises "reentrant call", which escaped the loop unsaved.
        try:
            os.write(2, INTERRUPT_NOTE)
        except OSError:  # no stderr: the stop itself still happens
            pass

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread (e.g. some test runners): no handler, plain KeyboardInterrupt
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def clip_grads(grads, max_norm: float):
    if max_norm <= 0:
        return grads
    return optim.clip_grad_norm(grads, max_norm)[0]


def build_step(model: nn.Module, optimizer: optim.Optimizer, loss_fn: Callable, grad_clip: float, compile: bool = True):
    """One optimisation step `step(*batch) -> (loss, aux)`; compiled with model and optimizer state captured.

    Under `mlx.launch` the gradients are averaged over the processes before clipping, so every rank applies
    the same update (clipping the global gradient, as one process with the whole batch would)."""
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    parallel = dist.size() > 1

    def step(*batch):
        (loss, aux), grads = loss_and_grad(model, *batch)
        if parallel:
            grads = nn.average_gradients(grads)
        optimizer.update(model, clip_grads(grads, grad_clip))
        return loss, aux

    if not compile:
        return step
    state = [model.state, optimizer.state]
    return partial(mx.compile, inputs=state, outputs=state)(step)


def optimizer_state_arrays(optimizer: optim.Optimizer) -> dict[str, mx.array]:
    return ckpt.flatten_tree(optimizer.state)


def restore_optimizer(optimizer: optim.Optimizer, model: nn.Module, flat: dict[str, mx.array]) -> None:
    """Load saved moments and step; `init` first so the state has the model's structure."""
    optimizer.init(model.trainable_parameters())
    if flat:
        optimizer.state = ckpt.unflatten_tree(flat)


def prefetch(make_batch: Callable[[int], tuple], start: int, stop: int) -> Iterator[tuple[int, tuple]]:
    """Yield (step, batch) for start..stop-1, preparing the next batch on a thread while the current step runs."""
    if start >= stop:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(make_batch, start)
        for step in range(start, stop):
            batch = future.result()
            if step + 1 < stop:
                future = pool.submit(make_batch, step + 1)
            yield step, batch


def fit(
    model: nn.Module,
    optimizer: optim.Optimizer,
    cfg: TrainConfig,
    loss_fn: Callable,
    make_batch: Callable[[int], tuple],
    start_step: int,
    evaluate: Callable[[int], dict],
    save: Callable[[int, dict], None],
    aux_name: str = "acc",
    log: Callable[[str], None] = print,
    compile: bool = True,
    shard_batch: Callable[[tuple, int, int], tuple] | None = None,
    prepare: Callable[[tuple], tuple] | None = None,
    resume_hint: str = RESUME_HINT,
    history: list | None = None,
) -> dict:
    """Train from `start_step` to `cfg.num_iters`.

    `make_batch(step)` returns numpy arrays for that step only (deterministic in the step, so resuming at step s
    sees the same data as an uninterrupted run). `loss_fn(model, *batch) -> (loss, (aux, ntokens))`.
    Evaluates at the first step, every `steps_per_eval` and the last; saves after each evaluation. A Ctrl+C
    stops after the step it interrupted, saves it, logs how to resume (`resume_hint`) and raises `Stopped`.
    Returns the last metrics.

    Under `mlx.launch` (see distributed.py) `make_batch` still returns the GLOBAL batch and each rank trains on
    its disjoint share, `shard_batch(batch, rank, size)` (default: contiguous rows of every array), so
    --batch_size means the same with 1 or N processes. `evaluate` runs on every rank (it may use collectives
    and must log on rank 0 only); only rank 0 logs, saves and reports losses averaged over ranks; a Ctrl+C on
    any rank stops all of them after the same step. `prepare(batch)` then adds what is made from the local batch
    on the host (arrays, or lists and tuples of them: the encoders' packing plans) before it reaches the step.

    `history` (the resumed checkpoint's, or empty) gets one record per report, {"step", "loss", <aux_name>, "lr",
    "it_per_s", "tok_per_s"}, and one per evaluation, {"step", "eval": {...}}: callers save it with the
    checkpoint, so a model's training curves follow it through resumes (`plots.py` draws them)."""
    _, rank, size = dist.world()
    main = rank == 0
    if size > 1:
        try:
            dist.check_divisible(cfg.batch_size, "--batch_size", size)
            dist.agree(start_step, "the step to resume from")
        except ValueError as e:
            raise UsageError(str(e)) from None
        # Same weights everywhere even if a rank initialised with another seed (optimizer state: same checkpoint).
        flat = tree_flatten(model.parameters())
        model.update(tree_unflatten(list(zip([k for k, _ in flat], dist.broadcast([v for _, v in flat])))))
        mx.eval(model.parameters())
        log = log if main else (lambda _msg: None)
    shard_batch = shard_batch or _shard_rows
    history = [] if history is None else history

    def evaluated(step: int) -> dict:
        result = evaluate(step)
        if result:
            history.append({"step": step, "eval": dict(result)})
        return result

    def local_batch(step: int) -> tuple:  # runs on the prefetch thread
        batch = make_batch(step) if size == 1 else shard_batch(make_batch(step), rank, size)
        return batch if prepare is None else prepare(batch)

    step_fn = build_step(model, optimizer, loss_fn, cfg.grad_clip, compile=compile)
    metrics: dict = {}
    if start_step >= cfg.num_iters:
        log(
            f"already trained to step {start_step} of {cfg.num_iters}; "
            "raise --num_iters (generator) or --retriever_iters to go on"
        )
        return metrics
    losses, auxes, ntoks = [], [], []
    tic = time.perf_counter()
    with GracefulInterrupt() as interrupt:

        def stop_asked() -> bool:  # a Ctrl+C seen by any rank (one tiny all_sum under mlx.launch)
            return dist.any_flag(interrupt.requested) if size > 1 else interrupt.requested

        for step, batch in prefetch(local_batch, start_step, cfg.num_iters):
            if step == start_step and start_step == 0:
                metrics = evaluated(step)
                tic = time.perf_counter()  # the report measures training, not evaluation
            with cores.spread():  # the step's rows over the CPU's cores
                loss, (aux, ntok) = step_fn(*batch_to_mx(batch))
                mx.eval(loss, aux, ntok, model.state, optimizer.state)
            losses.append(loss)
            auxes.append(aux)
            ntoks.append(ntok)
            done = step + 1
            # One tiny all_sum per step so that a Ctrl+C seen by any rank stops every rank after this step.
            stop = stop_asked()
            if done % cfg.steps_per_report == 0 or done == cfg.num_iters or stop:
                elapsed = time.perf_counter() - tic
                n = len(losses)
                # .item() only here, once per report; equal shards, so the mean of rank means is the global mean.
                summed = dist.all_sum(
                    mx.stack(
                        [
                            mx.mean(mx.stack(losses)),
                            mx.mean(mx.stack(auxes)),
                            mx.sum(mx.stack(ntoks)).astype(mx.float32),
                        ]
                    )
                )
                mean_loss, mean_aux = (summed[:2] / size).tolist()
                tokens = summed[2].item()
                lr = optimizer.learning_rate.item()
                log(
                    f"step {done:>6}/{cfg.num_iters}  loss {mean_loss:.4f}  {aux_name} {mean_aux:.3f}  "
                    f"lr {lr:.2e}  {n / elapsed:.2f} it/s  {tokens / elapsed:,.0f} tok/s  "
                    f"peak mem {mx.get_peak_memory() / 2**20:,.0f} MiB"
                )
                metrics["train_loss"] = mean_loss
                history.append(
                    {"step": done, "loss": mean_loss, aux_name: mean_aux, "lr": lr, "it_per_s": n / elapsed,
                     "tok_per_s": tokens / elapsed}
                )  # fmt: skip
                losses, auxes, ntoks = [], [], []
                tic = time.perf_counter()
            if done % cfg.steps_per_eval == 0 or done == cfg.num_iters:
                metrics.update(evaluated(done))
                if main:
                    save(done, metrics)
                tic = time.perf_counter()
            elif stop and main:  # between evaluations: this step's training loss, not the last evaluation's metrics
                save(done, {"train_loss": metrics["train_loss"]})
            if stop:
                log(f"stopped at step {done}; {resume_hint}")
                raise Stopped(done)
        # A Ctrl+C during the last step's evaluation or save: that step is saved, but the run stops here too.
        if stop_asked():
            log(f"stopped after the last step, {cfg.num_iters}")
            raise Stopped(cfg.num_iters)
    return metrics


def batch_to_mx(batch: tuple) -> tuple:
    """A host batch (numpy arrays, also in lists and tuples) as `mx` arrays."""
    return tree_map(mx.array, batch)


def _shard_rows(batch: tuple, rank: int, size: int) -> tuple:
    """The default share of a global batch: the same contiguous rows of every array."""
    return tuple(dist.shard(b, rank, size) for b in batch)


def count_parameters(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def load_or_init(
    directory,
    ckpt_type: str,
    model_cls,
    args_cls,
    model_defaults: dict,
    model_overrides: dict,
    tokenizer_sha1: str,
    identifier: str | None = None,
    new_model: bool = False,
    log: Callable[[str], None] = print,
    verb: str = "resuming from",
):
    """The model to train or use: from the newest valid checkpoint (or `identifier`), else freshly initialised.

    On resume the architecture comes from the checkpoint; a command-line value that contradicts it is an error.
    Returns (model, checkpoint or None)."""
    found = None
    if new_model and identifier is not None:
        raise UsageError(f"--new_model starts a fresh {ckpt_type}, so it cannot also resume {identifier!r}")
    if not new_model:
        try:
            found = ckpt.load_checkpoint(directory, ckpt_type, identifier, warn=log)
        except ckpt.CheckpointError as e:
            raise UsageError(str(e)) from None
    if found is None:
        if identifier is not None:
            raise UsageError(f"{ckpt_type} checkpoint {identifier!r} not found in {directory}")
        values = dict(model_defaults)
        values.update({k: v for k, v in model_overrides.items() if v is not None})
        try:
            args = args_cls(**values)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return model_cls(args), None
    saved = dict(found.metadata.get("model", {}))
    if model_overrides.get("checkpoint") is not None:  # gradient checkpointing is not architecture
        saved["checkpoint"] = model_overrides["checkpoint"]
    for k, v in model_overrides.items():
        if v is not None and k in saved and saved[k] != v:
            raise UsageError(
                f"--{k} {v} conflicts with {ckpt_type} checkpoint {found.id[:12]} ({k}={saved[k]}); "
                f"drop the flag to resume, or pass --new_model"
            )
    if found.metadata.get("tokenizer_sha1") != tokenizer_sha1:
        raise UsageError(
            f"{ckpt_type} checkpoint {found.id[:12]} was trained with another tokenizer than the dataset's; "
            f"rebuild the matching dataset or pass --new_model"
        )
    try:
        model = model_cls(args_cls(**saved))
    except (TypeError, ValueError) as e:  # a config from another version (unknown or missing fields), or bad values
        raise UsageError(
            f"{found.path.with_suffix('.json').name}: its model config does not fit this version ({e})"
        ) from None
    try:
        model.load_weights(list(found.weights.items()), strict=True)
    except ValueError as e:
        raise UsageError(f"{found.path.name}: weights do not match its config ({e})") from None
    mx.eval(model.parameters())
    log(f"{ckpt_type}: {verb} {found.id[:12]} (step {found.metadata.get('step', 0)})")
    return model, found


def save_state(
    directory,
    ckpt_type: str,
    model: nn.Module,
    optimizer: optim.Optimizer | None,
    step: int,
    cfg: TrainConfig,
    metrics: dict,
    extra: dict,
    parent: str | None,
) -> str:
    """Save weights, optimizer state and everything needed to resume as one atomic checkpoint."""
    meta = {
        "model": model.args.to_dict(),
        "train": dataclasses.asdict(cfg),
        "step": step,
        "data_position": {"seed": cfg.seed, "step": step},
        "metrics": metrics,
        "parent": parent,
    }
    meta.update(extra)
    weights = dict(tree_flatten(model.parameters()))
    opt = optimizer_state_arrays(optimizer) if optimizer is not None else None
    try:
        return ckpt.save_checkpoint(directory, ckpt_type, weights, opt, meta, keep=cfg.keep)
    except OSError as e:  # a full disk, a folder made read-only meanwhile: one line, not a traceback
        raise ckpt.CheckpointError(
            f"{directory}: cannot save the {ckpt_type} checkpoint of step {step} ({e.strerror or e}); "
            "the checkpoints saved before it are intact"
        ) from None
