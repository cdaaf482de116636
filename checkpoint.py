"""Durable, atomic, verifiable checkpoints for MLX training.

A checkpoint of type T in folder D is a set of files sharing one id, the sha1 hex digest of the weights file
(so `sha1sum D/<id>.T.safetensors` verifies it by hand):

    D/<id>.T.safetensors            weights, a flat dict name -> mx.array
    D/<id>.T.optimizer.safetensors  optimizer state, flat (absent when the caller passes None)
    D/<id>.T.json                   metadata: the caller's fields plus id, type, created, sha1_optimizer, format

Crash and Ctrl-C safety: every file is written to a ".tmp-*" name in the same folder, fsynced, then moved onto
its final name with `os.replace` (atomic on POSIX) and the folder is fsynced. A KeyboardInterrupt or crash
arriving at any moment therefore leaves each final name either absent or holding a complete file; the temp file
is removed on the way out (or later by `cleanup_temp_files`). The json is written last, so its presence marks a
complete checkpoint; weights left without a json by an interrupted save are ignored by readers and removed by
the next pruning save. Nothing is ever unpickled: arrays are read with `mx.load` on safetensors, metadata with json.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

FORMAT = 1
TEMP_PREFIX = ".tmp-"
RESERVED_FIELDS = ("id", "type", "created", "sha1_optimizer", "format")
MIN_PREFIX = 6

_TYPE_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_ID_RE = re.compile(r"^[0-9a-f]{40}$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")
# Errors that mx.load / json / the file system raise on missing, truncated or garbled files.
_READ_ERRORS = (OSError, RuntimeError, ValueError, MemoryError)


class CheckpointError(ValueError):
    """A checkpoint or artifact is missing, corrupt or ambiguous; the message is one line naming the file."""


@dataclass
class Checkpoint:
    """A loaded checkpoint; `path` is its weights file."""

    id: str
    type: str
    metadata: dict
    weights: dict[str, mx.array]
    optimizer_state: dict[str, mx.array]
    path: Path


# ---------------------------------------------------------------- atomic files


def fsync_dir(directory: Path) -> None:
    """Make a rename/unlink in `directory` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # platforms that cannot open folders (Windows) have nothing to fsync
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename itself is still atomic
    finally:
        os.close(fd)


def unwritable(path: str | Path) -> str | None:
    """Why this user could not make or write files in the folder `path` (its nearest existing ancestor decides
    when it does not exist yet), or None."""
    existing = Path(path)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not a folder this user can write to"
    return None


def _ensure_dir(directory: Path) -> None:
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        fsync_dir(directory.parent)


def _temp_path(directory: Path, suffix: str) -> Path:
    return directory / f"{TEMP_PREFIX}{uuid.uuid4().hex}{suffix}"


def _commit(tmp: Path, final: Path) -> None:
    """Atomically move a fully written and fsynced temp file onto its final name."""
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _write_temp(directory: Path, suffix: str, write: Callable[[Any], None]) -> Path:
    """Create a temp file in `directory`, let `write(f)` fill it, fsync it; removed again if anything goes wrong."""
    tmp = _temp_path(directory, suffix)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # KeyboardInterrupt included: never leave a half-written temp behind
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _replace_or_discard(tmp: Path, final: Path) -> None:
    try:
        _commit(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_with(path: str | Path, write: Callable[[Any], None]) -> None:
    """Fill `path` through `write(f)` on an open binary file, so that `path` only ever holds the old or the
    complete new content."""
    path = Path(path)
    _ensure_dir(path.parent)
    _replace_or_discard(_write_temp(path.parent, "-" + path.name, write), path)


def atomic_write_path(path: str | Path, write_to: Callable[[Path], None]) -> None:
    """The same for writers that need a file name (a library's `save(path)`): they write a temp name in the
    same folder, which is fsynced and renamed onto `path`."""
    path = Path(path)
    _ensure_dir(path.parent)
    tmp = _temp_path(path.parent, "-" + path.name)
    try:
        write_to(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _replace_or_discard(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` only ever holds the old or the complete new content."""
    atomic_write_with(path, lambda f: f.write(data))


def _finite(obj: Any) -> Any:
    """`obj` with NaN and infinite floats as None: JSON has no such numbers (a diverged loss would write "NaN")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_bytes(obj: Any, what: str) -> bytes:
    try:
        text = json.dumps(_finite(obj), sort_keys=True, indent=2)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: not JSON-serializable ({e})") from None
    return (text + "\n").encode("utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write `obj` as JSON (sorted keys, indent 2) to `path`."""
    atomic_write_bytes(path, _json_bytes(obj, str(path)))


def _check_arrays(arrays: Any, what: str) -> dict[str, mx.array]:
    if not isinstance(arrays, dict):
        raise ValueError(f"{what}: expected a flat dict name -> mx.array, got {type(arrays).__name__}")
    for k, v in arrays.items():
        if not isinstance(k, str) or not isinstance(v, mx.array):
            raise ValueError(f"{what}: entry {k!r} is {type(v).__name__}, expected mx.array (flatten_tree first?)")
    # Sorted so the same tensors always give the same bytes, hence the same sha1 id.
    return dict(sorted(arrays.items()))


def _write_temp_safetensors(
    directory: Path, suffix: str, arrays: dict[str, mx.array], metadata: dict[str, str] | None, what: str
) -> tuple[Path, str]:
    arrays = _check_arrays(arrays, what)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{what}: safetensors metadata must be dict[str, str]")
    mx.eval(list(arrays.values()))
    # Writing through our own file object avoids mx.save_safetensors appending ".safetensors" to the name.
    tmp = _write_temp(directory, suffix, lambda f: mx.save_safetensors(f, arrays, metadata=metadata))
    try:
        digest = sha1_file(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, digest


def atomic_save_safetensors(
    path: str | Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None
) -> str:
    """Atomically save a flat dict of arrays as safetensors at exactly `path`; return the sha1 hex of the file.

    Keys are written in sorted order, so equal dicts give byte-identical files.
    """
    path = Path(path)
    _ensure_dir(path.parent)
    tmp, digest = _write_temp_safetensors(path.parent, "-" + path.name, arrays, metadata, str(path))
    _replace_or_discard(tmp, path)
    return digest


def sha1_file(path: str | Path) -> str:
    """The sha1 hex digest of a file's bytes, read in chunks."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def read_safetensors(path: str | Path, sha1: str | None = None) -> dict[str, mx.array]:
    """Load and evaluate a safetensors file, optionally checking its sha1 first; CheckpointError if unusable.

    The counterpart of `atomic_save_safetensors` (weights, optimizer state, and earlier versions' single-file
    "<retriever id>.embedding.safetensors" index caches).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        if sha1 is not None:
            actual = sha1_file(path)
            if actual != sha1:
                raise CheckpointError(f"{path}: sha1 {actual} does not match expected {sha1} (corrupt or truncated)")
        arrays = mx.load(str(path), format="safetensors")
        # mx.load is lazy: evaluate now so truncation shows up here, not mid-training.
        mx.eval(list(arrays.values()))
    except CheckpointError:
        raise
    except _READ_ERRORS as e:
        raise CheckpointError(f"{path}: unreadable safetensors ({_one_line(e)})") from None
    return arrays


def cleanup_temp_files(directory: str | Path) -> int:
    """Remove every ".tmp-*" leftover in `directory` (call it only from the single writer); return how many."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for p in directory.iterdir():
        if p.name.startswith(TEMP_PREFIX) and p.is_file():
            p.unlink(missing_ok=True)
            removed += 1
    if removed:
        fsync_dir(directory)
    return removed


# ---------------------------------------------------------------- trees


def _is_int(key: str) -> bool:
    try:
        int(key)  # the same test tree_unflatten uses to turn a dict into a list
    except ValueError:
        return False
    return True


def _check_tree(tree: Any, prefix: str) -> None:
    """Reject trees that tree_flatten/tree_unflatten would not round-trip exactly."""
    where = prefix or "<root>"
    if isinstance(tree, dict):
        keys = list(tree)
        for k in keys:
            if not isinstance(k, str) or "." in k or k == "":
                raise ValueError(f"tree node {where}: key {k!r} must be a non-empty str without '.'")
        if keys and all(_is_int(k) for k in keys):
            raise ValueError(f"tree node {where}: a dict with only integer-like keys would come back as a list")
        for k, v in tree.items():
            _check_tree(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            _check_tree(v, f"{prefix}.{i}" if prefix else str(i))
    elif not isinstance(tree, mx.array):
        raise ValueError(f"tree leaf {where} is {type(tree).__name__}, expected mx.array")


def flatten_tree(tree: Any) -> dict[str, mx.array]:
    """Flatten nested dicts/lists of arrays (e.g. `optimizer.state`) to {"a.0.b": array}.

    Empty containers carry no arrays and are dropped; `Optimizer.init` recreates them.
    """
    _check_tree(tree, "")
    return dict(tree_flatten(tree))


def unflatten_tree(flat: dict[str, mx.array]) -> Any:
    """Inverse of `flatten_tree`: integer path components become list indices."""
    if not flat:
        return {}
    return tree_unflatten(list(flat.items()))


# ---------------------------------------------------------------- checkpoints


def _check_type(ckpt_type: str) -> None:
    if not isinstance(ckpt_type, str) or not _TYPE_RE.match(ckpt_type) or ckpt_type == "optimizer":
        raise ValueError(f"checkpoint type {ckpt_type!r}: use letters, digits, '_' or '-' (and not 'optimizer')")


def _weights_path(directory: Path, ckpt_id: str, ckpt_type: str) -> Path:
    return directory / f"{ckpt_id}.{ckpt_type}.safetensors"


def _optimizer_path(directory: Path, ckpt_id: str, ckpt_type: str) -> Path:
    return directory / f"{ckpt_id}.{ckpt_type}.optimizer.safetensors"


def _json_path(directory: Path, ckpt_id: str, ckpt_type: str) -> Path:
    return directory / f"{ckpt_id}.{ckpt_type}.json"


def _ids_with_suffix(directory: Path, suffix: str) -> list[str]:
    """Ids of files named "<40 hex>" + suffix; temp files never match because they start with '.'."""
    if not directory.is_dir():
        return []
    ids = []
    for p in directory.iterdir():
        name = p.name
        if name.endswith(suffix) and _ID_RE.match(name[: -len(suffix)]):
            ids.append(name[: -len(suffix)])
    return ids


def _read_metadata(directory: Path, ckpt_id: str, ckpt_type: str) -> dict:
    """Parse and sanity-check one json; CheckpointError naming the file otherwise."""
    path = _json_path(directory, ckpt_id, ckpt_type)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except _READ_ERRORS as e:
        raise CheckpointError(f"{path}: unreadable metadata ({_one_line(e)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata is not a JSON object")
    if meta.get("id") != ckpt_id or meta.get("type") != ckpt_type:
        raise CheckpointError(f"{path}: metadata id/type {meta.get('id')!r}/{meta.get('type')!r} do not match the name")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def _order_key(meta: dict) -> tuple[float, float, str]:
    created = meta.get("created")
    step = meta.get("step")
    num = (int, float)
    return (
        float(created) if isinstance(created, num) else 0.0,
        float(step) if isinstance(step, num) and not isinstance(step, bool) else -1.0,
        str(meta.get("id", "")),
    )


def _scan(directory: Path, ckpt_type: str) -> list[tuple[str, dict | None, CheckpointError | None]]:
    """Every "<id>.T.json" as (id, metadata or None, error or None), newest first.

    Unparseable ones are ordered by the json's mtime so load can report them where they fall.
    """
    entries = []
    for ckpt_id in _ids_with_suffix(directory, f".{ckpt_type}.json"):
        try:
            meta = _read_metadata(directory, ckpt_id, ckpt_type)
            entries.append((_order_key(meta), ckpt_id, meta, None))
        except CheckpointError as e:
            try:
                mtime = _json_path(directory, ckpt_id, ckpt_type).stat().st_mtime
            except OSError:
                continue  # deleted under us: nothing left to report
            entries.append(((mtime, -1.0, ckpt_id), ckpt_id, None, e))
    entries.sort(key=lambda e: e[0], reverse=True)
    return [(ckpt_id, meta, err) for _, ckpt_id, meta, err in entries]


def list_checkpoints(directory: str | Path, ckpt_type: str) -> list[dict]:
    """Metadata of the complete checkpoints of `ckpt_type`, newest first (by "created", then "step").

    Complete means the json is present and parseable; temp leftovers and weights without a json are ignored.
    """
    _check_type(ckpt_type)
    return [meta for _, meta, _ in _scan(Path(directory), ckpt_type) if meta is not None]


def _remove(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _prune(directory: Path, ckpt_type: str, keep: int, new_id: str) -> None:
    """Delete complete checkpoints beyond the `keep` newest, with what is cached under their id (a retriever's
    chunk index, `<id>.embedding*`), and weights/optimizer files left without a json."""
    complete = [m["id"] for m in list_checkpoints(directory, ckpt_type)]
    survivors = [new_id] + [i for i in complete if i != new_id][: keep - 1]
    for ckpt_id in complete:
        if ckpt_id not in survivors:
            # json first: the checkpoint stops being "complete" before its arrays disappear.
            _remove(
                [
                    _json_path(directory, ckpt_id, ckpt_type),
                    _optimizer_path(directory, ckpt_id, ckpt_type),
                    _weights_path(directory, ckpt_id, ckpt_type),
                    *sorted(directory.glob(f"{ckpt_id}.embedding*")),
                ]
            )
    with_json = set(_ids_with_suffix(directory, f".{ckpt_type}.json"))
    for suffix in (f".{ckpt_type}.optimizer.safetensors", f".{ckpt_type}.safetensors"):
        _remove([directory / f"{i}{suffix}" for i in _ids_with_suffix(directory, suffix) if i not in with_json])
    fsync_dir(directory)


def save_checkpoint(
    directory: str | Path,
    ckpt_type: str,
    weights: dict[str, mx.array],
    optimizer_state: dict[str, mx.array] | None,
    metadata: dict,
    keep: int | None = 3,
) -> str:
    """Write weights, optimizer state and metadata as one checkpoint; return its id (sha1 of the weights file).

    Order: weights (temp -> sha1 -> rename), optimizer file, json last. Only once the json is durable are the
    oldest complete checkpoints of this type beyond `keep` deleted (None keeps all). Saving identical weights
    again reuses the id and overwrites that checkpoint's files, its json removed first: interrupted, it is left
    incomplete (skipped) rather than complete with another save's optimizer state.
    """
    _check_type(ckpt_type)
    if keep is not None and keep < 1:
        raise ValueError(f"keep={keep}: must be >= 1 or None")
    if not isinstance(metadata, dict):
        raise ValueError(f"checkpoint metadata: expected a dict, got {type(metadata).__name__}")
    directory = Path(directory)
    _json_bytes(metadata, f"{ckpt_type} checkpoint metadata")  # fail before writing anything
    _ensure_dir(directory)

    tmp, ckpt_id = _write_temp_safetensors(directory, f".{ckpt_type}.safetensors", weights, None, "weights")
    _replace_or_discard(tmp, _weights_path(directory, ckpt_id, ckpt_type))
    json_path = _json_path(directory, ckpt_id, ckpt_type)
    if json_path.exists():  # these weights saved before: incomplete until the new json, never half old, half new
        json_path.unlink()
        fsync_dir(directory)

    opt_path = _optimizer_path(directory, ckpt_id, ckpt_type)
    if optimizer_state is None:
        sha1_optimizer = None
        # A stale file from an earlier save of the same weights would otherwise linger unreferenced.
        opt_path.unlink(missing_ok=True)
    else:
        sha1_optimizer = atomic_save_safetensors(opt_path, optimizer_state)

    meta = dict(metadata)
    # Checkpoints are ordered by "created": never before an earlier save's, so that a clock set back between two
    # saves (NTP correcting a fast clock) cannot make the older one the newest, to be resumed while pruning the rest.
    earlier = max((_order_key(m)[0] for m in list_checkpoints(directory, ckpt_type)), default=0.0)
    created = max(time.time(), math.nextafter(earlier, math.inf))
    meta.update(id=ckpt_id, type=ckpt_type, created=created, sha1_optimizer=sha1_optimizer, format=FORMAT)
    atomic_write_json(json_path, meta)

    if keep is not None:
        _prune(directory, ckpt_type, keep, ckpt_id)
    return ckpt_id


def _load_one(directory: Path, ckpt_id: str, ckpt_type: str, meta: dict | None, verify: bool) -> Checkpoint:
    if meta is None:
        meta = _read_metadata(directory, ckpt_id, ckpt_type)
    wpath = _weights_path(directory, ckpt_id, ckpt_type)
    weights = read_safetensors(wpath, ckpt_id if verify else None)
    sha1_optimizer = meta.get("sha1_optimizer")
    optimizer_state: dict[str, mx.array] = {}
    if sha1_optimizer is not None:
        opath = _optimizer_path(directory, ckpt_id, ckpt_type)
        optimizer_state = read_safetensors(opath, sha1_optimizer if verify else None)
    return Checkpoint(ckpt_id, ckpt_type, meta, weights, optimizer_state, wpath)


def resolve_id(directory: str | Path, kind: str, identifier: str, what: str | None = None) -> str:
    """The one id with a "<id>.<kind>.json" in `directory` that `identifier` (a full sha1 or a unique prefix of
    >= MIN_PREFIX hex characters, any case) names; a CheckpointError, its message starting with `what` (default
    "<kind> checkpoint"), when it is malformed, missing or ambiguous. `kind` "embedding" names chunk indexes."""
    what = what or f"{kind} checkpoint"
    ident = identifier.strip().lower()
    if len(ident) < MIN_PREFIX or not _HEX_RE.match(ident) or len(ident) > 40:
        raise CheckpointError(
            f"{what} {identifier!r}: expected a sha1 id or a prefix of >= {MIN_PREFIX} hex characters"
        )
    matches = sorted(i for i in _ids_with_suffix(Path(directory), f".{kind}.json") if i.startswith(ident))
    if not matches:
        raise CheckpointError(f"{what} {identifier!r}: not found in {directory}")
    if len(matches) > 1:
        names = ", ".join(matches)
        raise CheckpointError(f"{what} {identifier!r} is ambiguous in {directory}: {names}")
    return matches[0]


def read_metadata(directory: str | Path, ckpt_type: str, identifier: str | None = None) -> dict | None:
    """The JSON metadata of the newest complete `ckpt_type` checkpoint (None when there is none), or of the one
    `identifier` names (as `resolve_id`); nothing else is read."""
    _check_type(ckpt_type)
    if identifier is None:
        metas = list_checkpoints(directory, ckpt_type)
        return metas[0] if metas else None
    return _read_metadata(Path(directory), resolve_id(directory, ckpt_type, identifier), ckpt_type)


def load_checkpoint(
    directory: str | Path,
    ckpt_type: str,
    identifier: str | None = None,
    verify: bool = True,
    warn: Callable[[str], Any] = print,
) -> Checkpoint | None:
    """Load a checkpoint of `ckpt_type`; None when the folder holds none.

    identifier None: the newest valid one; each corrupt one passed over is reported by one `warn` line naming
    its file. An explicit identifier (full id or unique prefix of >= 6 hex chars) that is missing, ambiguous or
    corrupt raises CheckpointError. `verify` checks the sha1 of the weights and optimizer files.
    """
    _check_type(ckpt_type)
    directory = Path(directory)
    if identifier is not None:
        return _load_one(directory, resolve_id(directory, ckpt_type, identifier), ckpt_type, None, verify)
    for ckpt_id, meta, err in _scan(directory, ckpt_type):
        try:
            if err is not None:
                raise err
            return _load_one(directory, ckpt_id, ckpt_type, meta, verify)
        except CheckpointError as e:
            warn(f"warning: skipping corrupt {ckpt_type} checkpoint: {e}")
    return None
