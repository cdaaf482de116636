"""Transformer building blocks shared by the retriever and the generator.

Pre-norm blocks with fused projections (one QKV matmul; cross-attention folds its memory's KV projection into the
queries and outputs when training, see `CrossAttention`) and attention over all heads at once
(`cpu_kernels.attention`), so the CPU sees few, large GEMMs.

An encoder can also run *packed*: every position-wise layer (norms, projections, MLP: ~90% of its FLOPs) over the
batch's real tokens alone, and only attention over the padded [rows, L] layout (see `Packing`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import cores
from cpu_kernels import attention, rope, softmax

# Additive mask value: large enough to zero a softmax weight, and finite in float32 and bfloat16 (not in float16).
NEG_INF = -1e9


def check_dims(dim: int, num_heads: int, *depths: int) -> None:
    """Validate a transformer's shape: positive sizes, and heads of an even width (RoPE rotates pairs)."""
    if min(dim, num_heads, *depths) <= 0:
        raise ValueError("--dim, --num_blocks and --num_heads must be positive")
    if dim % num_heads or (dim // num_heads) % 2:
        raise ValueError(f"--dim {dim} must be a multiple of 2 x --num_heads {num_heads}")


def padding_mask(valid: mx.array, dtype=mx.float32) -> mx.array:
    """Additive attention mask [B, 1, 1, L] from a boolean [B, L] array of real (non-pad) positions."""
    return mx.where(valid, 0.0, NEG_INF).astype(dtype)[:, None, None, :]


class Packing(NamedTuple):
    """Where the real (non-pad) tokens of R rows of L positions are, for running position-wise layers over
    them alone (built on the host by `plan_packing`, as its shapes depend on the data).

    `idx` [N] int32: the flat positions (row * L + column) of the real tokens, in order, then pad positions up to
    a bucketed N (few distinct shapes for a compiled step); `inv` [R * L] int32: each position's row in the packed
    array, N for a pad position. Attention masks the pads as before, so packing changes no real token's value."""

    idx: mx.array
    inv: mx.array


@mx.custom_function
def pack(x: mx.array, idx: mx.array, inv: mx.array) -> mx.array:
    """[R * L, D] -> [N, D]: the rows of `x` at `idx`."""
    return mx.take(x, idx, axis=0)


@pack.vjp
def _pack_vjp(primals, cotangent, output):
    # Each real position is packed once, and a pad position's value is never used (a filler row that reads it
    # reaches no output): the gradient is the packed rows' gradient put back, zero at every pad position.
    _, idx, inv = primals
    padded = mx.concatenate([cotangent, mx.zeros((1, cotangent.shape[1]), cotangent.dtype)])
    return mx.take(padded, inv, axis=0), mx.zeros_like(idx), mx.zeros_like(inv)


@mx.custom_function
def unpack(h: mx.array, idx: mx.array, inv: mx.array) -> mx.array:
    """[N, D] -> [R * L, D]: each real position's packed row; a pad position gets a copy of a packed row (finite,
    and masked wherever it is read)."""
    return mx.take(h, mx.minimum(inv, h.shape[0] - 1), axis=0)


@unpack.vjp
def _unpack_vjp(primals, cotangent, output):
    # Pad positions are masked keys and values (softmax weight exactly 0) whose queries' outputs are dropped by
    # `pack`, so their gradient is exactly zero: the packed rows' gradient is the real positions' (and a filler
    # row's, which sits at a pad position, zero).
    _, idx, inv = primals
    return mx.take(cotangent, idx, axis=0), mx.zeros_like(idx), mx.zeros_like(inv)


def plan_packing(valid: np.ndarray, spreading: bool | None = None, granularity: int = 16) -> list[tuple] | None:
    """Host-side `Packing` arrays (numpy idx, inv) of `valid` [R, ...] (True at real tokens), one pair per row
    slice that `cores.map_rows` will use (`spreading` as in `cores.spread_row_slices`), or None when packing would
    not shrink the work. Give the `mx` arrays to the model wrapped in `cores.PerPart`.

    The packed length is the largest slice's real-token count rounded up to a multiple of 1/`granularity` of a
    slice's positions and shared by all slices, so a compiled step sees a handful of shapes (the generator's
    training batches in the built-in corpus: 3, doing 82% of the padded work).

    None too when a row (a question and all its passages) has no real token: attention then spreads evenly over
    its pad positions, which packing fills with copies of a packed row, so its values would differ."""
    if len(valid) and not np.asarray(valid).reshape(len(valid), -1).any(axis=1).all():
        return None
    flat = [np.asarray(valid[s]).reshape(-1) for s in cores.spread_row_slices(len(valid), spreading)]
    sizes = [f.size for f in flat]
    step = max(1, -(-max(sizes) // granularity))
    n = -(-max(int(f.sum()) for f in flat) // step) * step
    if not 0 < n < min(sizes):  # no padding to skip, or no real token at all (an empty packed array)
        return None
    plans = []
    for f in flat:
        real = np.flatnonzero(f).astype(np.int32)
        idx = np.concatenate([real, np.flatnonzero(~f)[: n - real.size].astype(np.int32)])
        inv = np.full(f.size, n, dtype=np.int32)
        inv[real] = np.arange(real.size, dtype=np.int32)
        plans.append((idx, inv))
    return plans


def to_device(plans: list[tuple] | None) -> list[tuple] | None:
    """`plan_packing`'s numpy arrays as `mx` arrays."""
    return None if plans is None else [tuple(mx.array(a) for a in plan) for plan in plans]


def append_to_cache(cache: dict, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
    """Write keys and values [B, H, L, d] after the cached ones and return views of all of them. The buffers grow
    by doubling, so a step writes only its own positions (MLX updates a buffer nothing else holds in place), where
    concatenating copied the whole cache at every token."""
    start, end = cache.get("length", 0), cache.get("length", 0) + k.shape[2]
    if "k" not in cache or end > cache["k"].shape[2]:
        B, H, _, d = k.shape
        for name in ("k", "v"):
            grown = mx.zeros((B, H, max(16, 2 * end), d), dtype=k.dtype)
            if start:
                grown[:, :, :start] = cache[name][:, :, :start]
            cache[name] = grown
    cache["k"][:, :, start:end] = k
    cache["v"][:, :, start:end] = v
    cache["length"] = end
    return cache["k"][:, :, :end], cache["v"][:, :, :end]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, rope_base: float = 10000.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = 1.0 / math.sqrt(dim // num_heads)
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.rope_base = rope_base

    def __call__(self, x: mx.array, mask=None, cache: dict | None = None, packing: Packing | None = None) -> mx.array:
        """x [B, L, D]; or packed [N, D] with `packing` and the padding mask [B, 1, 1, L] (attention itself runs
        over the padded layout)."""
        qkv = self.qkv_proj(x)
        if packing is None:
            B, L, D = x.shape
        else:
            L, D = mask.shape[-1], x.shape[-1]
            B = packing.inv.shape[0] // L
            qkv = unpack(qkv, *packing).reshape(B, L, 3 * D)
        q, k, v = mx.split(qkv, 3, axis=-1)
        H = self.num_heads  # head sizes spelled out: a reshape cannot infer a -1 axis of an empty batch
        q, k, v = (t.reshape(B, L, H, D // H).transpose(0, 2, 1, 3) for t in (q, k, v))
        if cache is None:
            q, k = rope(q, k, base=self.rope_base)
        else:
            q, k = rope(q, k, base=self.rope_base, offset=cache.get("length", 0), tables=cache.setdefault("rope", {}))
            k, v = append_to_cache(cache, k, v)
        o = attention(q, k, v, self.scale, mask)
        if packing is None:
            return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, L, D))
        return self.out_proj(pack(o.transpose(0, 2, 1, 3).reshape(B * L, D), *packing))


class CrossAttention(nn.Module):
    """Attention from the decoder's positions to the encoded memory [B, S, D].

    Without a cache, the memory's key and value projections are folded into the queries and the outputs:
    q_h (M Wk_h^T)^T = (q_h Wk_h) M^T and p_h (M Wv_h^T) = (p_h M) Wv_h^T, the same function and parameters
    without the projected keys and values. The memory is far longer than an answer (5 passages of 80 tokens
    against ~8 answer tokens), so this is ~4x fewer multiply-adds (the generator's training step 526 -> 463 ms).
    A decoding step (one token, with a cache) is faster the usual way, reading per-head keys and values
    projected once per question: one matrix-vector product per head instead of a 4-row product per block that
    OpenBLAS packs the whole memory for."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = 1.0 / math.sqrt(dim // num_heads)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def __call__(self, x: mx.array, memory: mx.array, mask=None, cache: dict | None = None) -> mx.array:
        """x [B, L, D] attends to memory [B, S, D]; `mask`: the memory's additive padding mask [B, 1, 1, S]."""
        if cache is not None:
            return self._cached(x, memory, mask, cache)
        B, L, D = x.shape
        H = self.num_heads
        wk, wv = (w.reshape(H, -1, D) for w in mx.split(self.kv_proj.weight, 2, axis=0))  # [H, d, D] each
        q = (self.q_proj(x) * self.scale).reshape(B * L, H, -1).transpose(1, 0, 2)  # [H, B*L, d]
        q = (q @ wk).reshape(H, B, L, D).transpose(1, 0, 2, 3).reshape(B, H * L, D)  # queries in memory space
        scores = q @ memory.swapaxes(1, 2)  # [B, H*L, S]
        if mask is not None:
            scores = scores + mask[:, 0]
        read = softmax(scores) @ memory  # [B, H*L, D]: each head's weighted memory, before its value projection
        o = read.reshape(B, H, L, D).transpose(1, 0, 2, 3).reshape(H, B * L, D) @ wv.swapaxes(1, 2)  # [H, B*L, d]
        return self.out_proj(o.transpose(1, 0, 2).reshape(B, L, D))

    def _cached(self, x: mx.array, memory: mx.array, mask, cache: dict) -> mx.array:
        B, L, D = x.shape
        q = self.q_proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        if "k" not in cache:  # the memory never changes while decoding: project it once per question
            S = memory.shape[1]
            k, v = mx.split(self.kv_proj(memory), 2, axis=-1)
            k, v = (t.reshape(B, S, self.num_heads, -1).transpose(0, 2, 1, 3) for t in (k, v))
            # stored contiguous: every decoding step reads them, and a strided view would be copied each time
            cache["k"], cache["v"] = mx.contiguous(k), mx.contiguous(v)
        o = attention(q, cache["k"], cache["v"], self.scale, mask)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        # Squared ReLU (So et al., Primer): as good as GELU here, and MLX's CPU backend evaluates
        # transcendental elementwise ops (tanh, erf, exp) one core at a time, ~100x slower than max/mul.
        return self.down(mx.square(nn.relu(self.up(x))))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.mlp_norm = nn.RMSNorm(dim)
        self.mlp = MLP(dim, mlp_ratio * dim)

    def __call__(self, x: mx.array, mask=None, packing: Packing | None = None) -> mx.array:
        x = x + self.attn(self.attn_norm(x), mask, packing=packing)
        return x + self.mlp(self.mlp_norm(x))


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.self_norm = nn.RMSNorm(dim)
        self.self_attn = SelfAttention(dim, num_heads)
        self.cross_norm = nn.RMSNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.mlp_norm = nn.RMSNorm(dim)
        self.mlp = MLP(dim, mlp_ratio * dim)

    def __call__(self, x, memory, self_mask, memory_mask, cache: dict | None = None) -> mx.array:
        self_cache = cross_cache = None
        if cache is not None:
            self_cache = cache.setdefault("self", {})
            cross_cache = cache.setdefault("cross", {})
        x = x + self.self_attn(self.self_norm(x), self_mask, self_cache)
        x = x + self.cross_attn(self.cross_norm(x), memory, memory_mask, cross_cache)
        return x + self.mlp(self.mlp_norm(x))


class Encoder(nn.Module):
    """A stack of encoder blocks over already-embedded tokens [B, L, D]; with a `Packing`, the position-wise layers
    run over the real tokens only (same outputs at real positions; pad positions hold copies of real ones)."""

    def __init__(self, dim: int, num_blocks: int, num_heads: int, checkpoint: bool = False):
        super().__init__()
        self.blocks = [EncoderBlock(dim, num_heads) for _ in range(num_blocks)]
        self.norm = nn.RMSNorm(dim)
        self.checkpoint = checkpoint

    def __call__(self, x: mx.array, mask=None, packing: Packing | tuple | None = None) -> mx.array:
        """`packing` may come as a plain (idx, inv) tuple: `mx.compile` hands pytrees through as tuples."""
        shape = x.shape
        if packing is not None:
            packing = Packing(*packing)
            x = pack(x.reshape(-1, shape[-1]), *packing)
        for block in self.blocks:
            x = nn.utils.checkpoint(block)(x, mask, packing) if self.checkpoint else block(x, mask, packing)
        x = self.norm(x)
        return x if packing is None else unpack(x, *packing).reshape(shape)


def init_embedding(embedding: nn.Embedding, dim: int) -> None:
    """Scale token embeddings so that tied output logits start near zero."""
    embedding.weight = mx.random.normal(embedding.weight.shape) * (dim**-0.5)
