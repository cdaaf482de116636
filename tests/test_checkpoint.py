"""Checkpoints: bit-exact round trips, sha1 ids, atomicity, corruption handling, pruning, optimizer resume."""

from __future__ import annotations

import hashlib
import json
import sys
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import checkpoint as ckpt  # noqa: E402


def as_numpy(a: mx.array) -> np.ndarray:
    """Bit pattern as numpy; bfloat16 has no numpy dtype, so compare its raw 16-bit words."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.array(a)


def assert_same_arrays(got: dict[str, mx.array], want: dict[str, mx.array]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        assert np.array_equal(as_numpy(got[k]), as_numpy(want[k])), k


def make_weights(seed: int) -> dict[str, mx.array]:
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    return {
        "embed.weight": mx.random.normal((8, 4), key=k1),
        "head.weight": mx.random.normal((4, 3), key=k2).astype(mx.bfloat16),
        "head.scale": mx.array([0.5, -1.25], dtype=mx.float16),
        "positions": mx.arange(5, dtype=mx.int32) + seed,
        "mask": mx.array([True, False, True]),
    }


def save(tmp_path: Path, seed: int, step: int, keep: int | None = None, ckpt_type: str = "retriever") -> str:
    opt = {"step": mx.array(step, dtype=mx.uint64), "embed.weight.m": mx.full((8, 4), float(seed))}
    return ckpt.save_checkpoint(tmp_path, ckpt_type, make_weights(seed), opt, {"step": step}, keep=keep)


def weights_file(tmp_path: Path, ckpt_id: str, ckpt_type: str = "retriever") -> Path:
    return tmp_path / f"{ckpt_id}.{ckpt_type}.safetensors"


def test_round_trip_is_bit_exact_and_metadata_complete(tmp_path):
    weights = make_weights(0)
    opt = {
        "step": mx.array(3, dtype=mx.uint64),
        "learning_rate": mx.array(1e-3),
        "layers.0.weight.m": mx.random.normal((4, 4)),
        "layers.0.weight.v": mx.random.uniform(shape=(4, 4)).astype(mx.bfloat16),
    }
    meta = {"step": 3, "model": {"dim": 4, "layers": 2}, "best": 0.25, "parent": None, "tokenizer": "abc"}
    ckpt_id = ckpt.save_checkpoint(tmp_path, "retriever", weights, opt, meta)

    loaded = ckpt.load_checkpoint(tmp_path, "retriever")
    assert loaded is not None and loaded.id == ckpt_id and loaded.type == "retriever"
    assert loaded.path == weights_file(tmp_path, ckpt_id)
    assert_same_arrays(loaded.weights, weights)
    assert_same_arrays(loaded.optimizer_state, opt)
    for k, v in meta.items():
        assert loaded.metadata[k] == v
    assert loaded.metadata["id"] == ckpt_id
    assert loaded.metadata["type"] == "retriever"
    assert loaded.metadata["format"] == 1
    assert isinstance(loaded.metadata["created"], float)
    opt_file = tmp_path / f"{ckpt_id}.retriever.optimizer.safetensors"
    assert loaded.metadata["sha1_optimizer"] == hashlib.sha1(opt_file.read_bytes()).hexdigest()
    # The json is sorted and indented so diffs between checkpoints read well.
    text = (tmp_path / f"{ckpt_id}.retriever.json").read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def test_id_is_sha1sum_of_weights_file_and_deterministic(tmp_path):
    ckpt_id = save(tmp_path, seed=1, step=1)
    assert hashlib.sha1(weights_file(tmp_path, ckpt_id).read_bytes()).hexdigest() == ckpt_id
    # Same tensors in another insertion order -> same bytes -> same id.
    reordered = dict(reversed(list(make_weights(1).items())))
    again = ckpt.save_checkpoint(tmp_path / "other", "retriever", reordered, None, {"step": 1})
    assert again == ckpt_id


def test_saving_same_weights_twice_overwrites_json_and_keeps_count(tmp_path):
    first = save(tmp_path, seed=0, step=1, keep=2)
    second = save(tmp_path, seed=0, step=2, keep=2)
    assert first == second
    listed = ckpt.list_checkpoints(tmp_path, "retriever")
    assert [m["id"] for m in listed] == [first]
    assert listed[0]["step"] == 2
    # Resaving without optimizer state must not leave the old optimizer file behind.
    ckpt.save_checkpoint(tmp_path, "retriever", make_weights(0), None, {"step": 3}, keep=2)
    loaded = ckpt.load_checkpoint(tmp_path, "retriever")
    assert loaded.metadata["step"] == 3 and loaded.metadata["sha1_optimizer"] is None
    assert loaded.optimizer_state == {}
    assert not (tmp_path / f"{first}.retriever.optimizer.safetensors").exists()


def test_list_is_newest_first_and_types_are_separate(tmp_path):
    ids = [save(tmp_path, seed=s, step=s) for s in range(3)]
    gen = save(tmp_path, seed=10, step=10, ckpt_type="generator")
    assert [m["id"] for m in ckpt.list_checkpoints(tmp_path, "retriever")] == ids[::-1]
    assert [m["id"] for m in ckpt.list_checkpoints(tmp_path, "generator")] == [gen]
    assert ckpt.load_checkpoint(tmp_path, "retriever").id == ids[-1]


def test_save_order_survives_a_clock_that_jumps(tmp_path, monkeypatch):
    """A checkpoint saved while the clock ran an hour fast (corrected by NTP afterwards) must not outrank the ones
    saved after it, nor make pruning delete them and a resume go back to it."""
    real = ckpt.time.time
    monkeypatch.setattr(ckpt.time, "time", lambda: real() + 3600)
    save(tmp_path, seed=0, step=200, keep=2)
    monkeypatch.setattr(ckpt.time, "time", real)
    later = [save(tmp_path, seed=s, step=s * 200, keep=2) for s in (2, 3, 4)]
    assert [m["step"] for m in ckpt.list_checkpoints(tmp_path, "retriever")] == [800, 600]
    assert ckpt.load_checkpoint(tmp_path, "retriever").id == later[-1]


def test_temp_leftovers_are_ignored_and_cleaned(tmp_path):
    good = save(tmp_path, seed=0, step=1)
    newer = {"id": "f" * 40, "type": "retriever", "created": 1e12, "step": 99, "format": 1, "sha1_optimizer": None}
    (tmp_path / ".tmp-deadbeef.retriever.json").write_text(json.dumps(newer))
    (tmp_path / ".tmp-cafe.retriever.safetensors").write_bytes(b"\x00partial")
    warnings = []
    assert [m["id"] for m in ckpt.list_checkpoints(tmp_path, "retriever")] == [good]
    assert ckpt.load_checkpoint(tmp_path, "retriever", warn=warnings.append).id == good
    assert warnings == []
    assert ckpt.cleanup_temp_files(tmp_path) == 2
    assert not list(tmp_path.glob(".tmp-*"))
    assert ckpt.cleanup_temp_files(tmp_path) == 0


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 16, len(data)):  # inside the tensor data, so the header still parses
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [flip_bytes, truncate], ids=["flipped", "truncated"])
def test_corrupt_newest_is_skipped_with_one_warning(tmp_path, damage):
    older = save(tmp_path, seed=0, step=1)
    newest = save(tmp_path, seed=1, step=2)
    bad = weights_file(tmp_path, newest)
    damage(bad)

    warnings = []
    loaded = ckpt.load_checkpoint(tmp_path, "retriever", warn=warnings.append)
    assert loaded.id == older
    assert_same_arrays(loaded.weights, make_weights(0))
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert bad.name in warnings[0]

    with pytest.raises(ckpt.CheckpointError, match=bad.name) as err:
        ckpt.load_checkpoint(tmp_path, "retriever", newest)
    assert "\n" not in str(err.value)


def test_truncation_is_caught_even_without_sha1_verification(tmp_path):
    older = save(tmp_path, seed=0, step=1)
    newest = save(tmp_path, seed=1, step=2)
    truncate(weights_file(tmp_path, newest))
    warnings = []
    assert ckpt.load_checkpoint(tmp_path, "retriever", verify=False, warn=warnings.append).id == older
    assert len(warnings) == 1 and weights_file(tmp_path, newest).name in warnings[0]


def test_corrupt_optimizer_file_and_bad_json_are_skipped(tmp_path):
    oldest = save(tmp_path, seed=0, step=1)
    middle = save(tmp_path, seed=1, step=2)
    newest = save(tmp_path, seed=2, step=3)
    flip_bytes(tmp_path / f"{middle}.retriever.optimizer.safetensors")
    (tmp_path / f"{newest}.retriever.json").write_text("{not json")

    assert [m["id"] for m in ckpt.list_checkpoints(tmp_path, "retriever")] == [middle, oldest]
    warnings = []
    assert ckpt.load_checkpoint(tmp_path, "retriever", warn=warnings.append).id == oldest
    assert len(warnings) == 2
    assert f"{newest}.retriever.json" in warnings[0]
    assert f"{middle}.retriever.optimizer.safetensors" in warnings[1]


def test_explicit_identifier_full_prefix_missing_and_short(tmp_path):
    a = save(tmp_path, seed=0, step=1)
    b = save(tmp_path, seed=1, step=2)
    assert ckpt.load_checkpoint(tmp_path, "retriever", a).id == a
    assert ckpt.load_checkpoint(tmp_path, "retriever", a[:8]).id == a
    assert ckpt.load_checkpoint(tmp_path, "retriever", b[:6].upper()).id == b
    with pytest.raises(ckpt.CheckpointError, match="0" * 40):
        ckpt.load_checkpoint(tmp_path, "retriever", "0" * 40)
    with pytest.raises(ckpt.CheckpointError, match="abc"):
        ckpt.load_checkpoint(tmp_path, "retriever", "abc")
    with pytest.raises(ckpt.CheckpointError, match="generator"):
        ckpt.load_checkpoint(tmp_path, "generator", a)


def test_ambiguous_prefix_raises(tmp_path):
    real = save(tmp_path, seed=0, step=1)
    twin = real[:6] + ("0" if real[6] != "0" else "1") + real[7:]
    (tmp_path / f"{twin}.retriever.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match="ambiguous"):
        ckpt.load_checkpoint(tmp_path, "retriever", real[:6])
    assert ckpt.load_checkpoint(tmp_path, "retriever", real[:7]).id == real


def test_empty_or_missing_folder_gives_none(tmp_path):
    assert ckpt.load_checkpoint(tmp_path / "nope", "retriever") is None
    assert ckpt.list_checkpoints(tmp_path, "retriever") == []


def test_keep_two_leaves_exactly_the_two_newest(tmp_path):
    ids = [save(tmp_path, seed=s, step=s, keep=2) for s in range(4)]
    assert [m["id"] for m in ckpt.list_checkpoints(tmp_path, "retriever")] == [ids[3], ids[2]]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 6  # weights + optimizer + json for each of the two
    assert all(n.startswith((ids[3], ids[2])) for n in names)


def test_keep_none_keeps_all(tmp_path):
    for s in range(4):
        save(tmp_path, seed=s, step=s, keep=None)
    assert len(ckpt.list_checkpoints(tmp_path, "retriever")) == 4


def test_crash_between_weights_and_json_leaves_ignored_checkpoint(tmp_path):
    good = save(tmp_path, seed=0, step=1)
    # What a crash right after the weights rename leaves: a complete weights file with no json.
    orphan = ckpt.atomic_save_safetensors(tmp_path / "x.safetensors", make_weights(1))
    (tmp_path / "x.safetensors").rename(weights_file(tmp_path, orphan))

    assert [m["id"] for m in ckpt.list_checkpoints(tmp_path, "retriever")] == [good]
    assert ckpt.load_checkpoint(tmp_path, "retriever").id == good
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(tmp_path, "retriever", orphan)
    # The next pruning save removes the orphan.
    save(tmp_path, seed=2, step=2, keep=3)
    assert not weights_file(tmp_path, orphan).exists()


def test_keyboard_interrupt_before_json_keeps_previous(tmp_path, monkeypatch):
    good = save(tmp_path, seed=0, step=1)

    def interrupted(path, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "atomic_write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, seed=1, step=2)
    monkeypatch.undo()
    assert not list(tmp_path.glob(".tmp-*"))
    assert [m["id"] for m in ckpt.list_checkpoints(tmp_path, "retriever")] == [good]
    assert ckpt.load_checkpoint(tmp_path, "retriever").id == good


def test_resaving_the_same_weights_interrupted_never_leaves_a_mixed_checkpoint(tmp_path, monkeypatch):
    """The same weights saved again with another optimizer state, interrupted before the json: the checkpoint
    must not stay "complete" with the old json and the new optimizer file (loading would reject it as corrupt)."""
    first = save(tmp_path, seed=0, step=1)
    other_opt = {"step": mx.array(2, dtype=mx.uint64), "embed.weight.m": mx.full((8, 4), 7.0)}

    def interrupted(path, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "atomic_write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, "retriever", make_weights(0), other_opt, {"step": 2})
    monkeypatch.undo()
    warnings = []
    assert ckpt.load_checkpoint(tmp_path, "retriever", warn=warnings.append) is None and not warnings
    assert ckpt.save_checkpoint(tmp_path, "retriever", make_weights(0), other_opt, {"step": 2}) == first
    assert ckpt.load_checkpoint(tmp_path, "retriever").metadata["step"] == 2


def test_pruning_a_retriever_removes_its_chunk_index_cache(tmp_path):
    old = save(tmp_path, seed=0, step=1, keep=1)
    for name in (f"{old}.embedding.json", f"{old}.embedding-0-of-1.npy", f"{old}.embedding.faiss"):
        (tmp_path / name).write_bytes(b"x")
    new = save(tmp_path, seed=1, step=2, keep=1)
    (tmp_path / f"{new}.embedding.json").write_bytes(b"x")
    save(tmp_path, seed=1, step=2, keep=1)  # the same weights again: nothing of its own is pruned
    assert sorted(p.name for p in tmp_path.iterdir() if ".embedding" in p.name) == [f"{new}.embedding.json"]


def test_keyboard_interrupt_mid_write_leaves_no_file(tmp_path, monkeypatch):
    good = save(tmp_path, seed=0, step=1)
    before = sorted(p.name for p in tmp_path.iterdir())
    real_save = mx.save_safetensors

    def half_written(f, arrays, metadata=None):
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a torn header, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(mx, "save_safetensors", half_written)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, seed=1, step=2)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save_safetensors(tmp_path / "cache.embedding.safetensors", {"e": mx.ones((2,))})
    monkeypatch.setattr(mx, "save_safetensors", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert ckpt.load_checkpoint(tmp_path, "retriever").id == good


def test_atomic_save_safetensors_keeps_exact_name_and_returns_sha1(tmp_path):
    arrays = {"e": mx.arange(6, dtype=mx.float32).reshape(2, 3)}
    target = tmp_path / "sub" / "abc.embedding"  # no ".safetensors" suffix: must not be appended
    digest = ckpt.atomic_save_safetensors(target, arrays, metadata={"retriever": "abc"})
    assert sorted(p.name for p in target.parent.iterdir()) == ["abc.embedding"]
    assert digest == ckpt.sha1_file(target) == hashlib.sha1(target.read_bytes()).hexdigest()
    assert_same_arrays(ckpt.read_safetensors(target, sha1=digest), arrays)
    with pytest.raises(ckpt.CheckpointError, match="abc.embedding"):
        ckpt.read_safetensors(target, sha1="0" * 40)


def test_atomic_write_json_and_bytes(tmp_path):
    ckpt.atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    ckpt.atomic_write_bytes(tmp_path / "m.json", b"new")
    assert (tmp_path / "m.json").read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
    with pytest.raises(ValueError, match="m2.json"):
        ckpt.atomic_write_json(tmp_path / "m2.json", {"x": object()})
    assert not (tmp_path / "m2.json").exists()


def test_non_finite_numbers_are_written_as_null(tmp_path):
    """A diverged run's NaN or infinite loss (metrics, training history) made the metadata invalid JSON ("NaN",
    which strict readers refuse); it is null, as the plots and the JSON standard expect."""

    def strict(constant):
        raise ValueError(f"not JSON: {constant}")

    history = [{"step": 1, "loss": float("nan"), "eval": {"val_loss": float("inf")}}, {"step": 2, "loss": 1.5}]
    ckpt.atomic_write_json(tmp_path / "m.json", {"history": history, "lr": float("-inf"), "n": 3})
    got = json.loads((tmp_path / "m.json").read_text(), parse_constant=strict)
    assert got == {"history": [{"step": 1, "loss": None, "eval": {"val_loss": None}}, {"step": 2, "loss": 1.5}],
                   "lr": None, "n": 3}  # fmt: skip


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not JSON-serializable"):
        ckpt.save_checkpoint(tmp_path, "retriever", make_weights(0), None, {"best": np.float32(1.0)})
    assert list(tmp_path.iterdir()) == []  # nothing written before the metadata was checked
    with pytest.raises(ValueError, match="mx.array"):
        ckpt.save_checkpoint(tmp_path, "retriever", {"w": np.ones(3)}, None, {})
    with pytest.raises(ValueError, match="type"):
        ckpt.save_checkpoint(tmp_path, "re.triever", make_weights(0), None, {})
    with pytest.raises(ValueError, match="keep"):
        ckpt.save_checkpoint(tmp_path, "retriever", make_weights(0), None, {}, keep=0)


def test_flatten_tree_round_trip_and_rejections():
    tree = {
        "step": mx.array(2, dtype=mx.uint64),
        "layers": [{"w": {"m": mx.ones((2,))}}, {}, {"w": {"m": mx.zeros((1,))}}],
    }
    flat = ckpt.flatten_tree(tree)
    assert sorted(flat) == ["layers.0.w.m", "layers.2.w.m", "step"]
    back = ckpt.unflatten_tree(flat)
    assert isinstance(back["layers"], list) and back["layers"][1] == {}
    assert_same_arrays(ckpt.flatten_tree(back), flat)
    assert ckpt.unflatten_tree({}) == {}
    with pytest.raises(ValueError, match="a.b"):
        ckpt.flatten_tree({"a.b": mx.ones((1,))})
    with pytest.raises(ValueError, match="lr"):
        ckpt.flatten_tree({"lr": 0.1})
    with pytest.raises(ValueError, match="list"):
        ckpt.flatten_tree({"d": {"0": mx.ones((1,))}})


# ---------------------------------------------------------------- optimizer resume


def tiny_model() -> nn.Module:
    # Param-less layers in the middle and at the end: their empty state entries vanish when flattened.
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.ReLU())


def make_optimizer() -> optim.Optimizer:
    schedule = optim.cosine_decay(1e-2, 100)  # depends on the restored uint64 step
    return optim.AdamW(learning_rate=schedule, weight_decay=0.05)


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).mean()


def make_step(model, optimizer, compiled: bool):
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        optimizer.update(model, grads)
        return loss

    if not compiled:
        return step
    state = [model.state, optimizer.state]
    return partial(mx.compile, inputs=state, outputs=state)(step)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_adamw_restored_from_disk_continues_identically(tmp_path, compiled):
    mx.random.seed(0)
    x = mx.random.normal((16, 4))
    y = mx.random.normal((16, 2))

    model = tiny_model()
    optimizer = make_optimizer()
    step = make_step(model, optimizer, compiled)
    for _ in range(3):
        step(x, y)
        mx.eval(model.state, optimizer.state)

    flat_state = ckpt.flatten_tree(optimizer.state)
    assert_same_arrays(ckpt.flatten_tree(ckpt.unflatten_tree(flat_state)), flat_state)
    ckpt.save_checkpoint(tmp_path, "generator", ckpt.flatten_tree(model.parameters()), flat_state, {"step": 3})

    loaded = ckpt.load_checkpoint(tmp_path, "generator")
    restored = tiny_model()
    restored.load_weights(list(loaded.weights.items()), strict=True)
    restored_opt = make_optimizer()
    restored_opt.state = ckpt.unflatten_tree(loaded.optimizer_state)
    restored_opt.init(restored.trainable_parameters())  # fills the dropped empty entries, keeps the moments
    restored_step = make_step(restored, restored_opt, compiled)
    mx.eval(restored.parameters())

    for _ in range(2):
        loss_a, loss_b = step(x, y), restored_step(x, y)
        mx.eval(model.state, optimizer.state, restored.state, restored_opt.state, loss_a, loss_b)
        assert loss_a.item() == loss_b.item()
        assert_same_arrays(ckpt.flatten_tree(restored.parameters()), ckpt.flatten_tree(model.parameters()))
        assert_same_arrays(ckpt.flatten_tree(restored_opt.state), ckpt.flatten_tree(optimizer.state))
    assert restored_opt.step.item() == 5
