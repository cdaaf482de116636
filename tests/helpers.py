"""Tiny shared fixtures for the core-pipeline tests: a small built-in dataset and 1-block models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets as D  # noqa: E402  (the project's module, not Hugging Face's)

VOCAB = 400  # byte fallback needs >= 256 + 4 + distinct characters (~320 for the built-in corpus)


def quiet(_msg: str) -> None:
    """A `log` that drops everything."""


def build_builtin(
    to_dir: Path, corpus_size: int = 40, vocab_size: int = VOCAB, context_size: int = 32, log=quiet
) -> D.Dataset:
    """Build (or reuse) a built-in corpus cache in `to_dir` and open it."""
    D.build_dataset(D.SourceSpec(corpus_size=corpus_size), to_dir, vocab_size, context_size, log=log)
    return D.Dataset(to_dir)


def tiny_retriever(vocab_size: int, seed: int = 0, **kw):
    import mlx.core as mx
    import retriever as R

    mx.random.seed(seed)
    args = dict(vocab_size=vocab_size, dim=32, num_blocks=1, num_heads=2, embedding_dim=16)
    args.update(kw)
    return R.Retriever(R.ModelArgs(**args))


def tiny_generator(vocab_size: int, seed: int = 0, **kw):
    import mlx.core as mx
    import generator as G

    mx.random.seed(seed)
    args = dict(vocab_size=vocab_size, dim=32, num_blocks=1, num_decoder_blocks=2, num_heads=4, max_answer_tokens=8)
    args.update(kw)
    return G.Generator(G.ModelArgs(**args))


def weights_numpy(model) -> dict[str, np.ndarray]:
    """A model's parameters as numpy arrays, keyed by their dotted names."""
    from mlx.utils import tree_flatten

    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative name -> bytes), to prove a folder was left untouched."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_bytes_named(folder: Path, name: bytes, data: bytes) -> None:
    """Write `data` to a file in `folder` whose name is raw bytes (not UTF-8, say); skip the test on a file system
    that refuses such names."""
    try:
        fd = os.open(os.path.join(os.fsencode(folder), name), os.O_WRONLY | os.O_CREAT)
    except OSError:
        pytest.skip("this file system takes UTF-8 file names only")
    os.write(fd, data)
    os.close(fd)


def mlx_lib_dir() -> Path:
    """The folder of the installed MLX's libmlx."""
    import mlx.core as mx

    return Path(mx.__file__).resolve().parent / "lib"
