"""Transformer building blocks shared by the retriever and the generator.

Pre-norm blocks with fused projections (one QKV matmul, one KV matmul for cross-attention) and
attention over all heads at once (`cpu_kernels.attention`), so the CPU sees few, large GEMMs.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from cpu_kernels import attention, rope

# Additive mask value: large enough to zero a softmax weight, small enough to stay finite in fp16.
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

    def __call__(self, x: mx.array, mask=None, cache: dict | None = None) -> mx.array:
        B, L, D = x.shape
        q, k, v = mx.split(self.qkv_proj(x), 3, axis=-1)
        q, k, v = (t.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
        q, k = rope(q, k, base=self.rope_base, offset=0 if cache is None else cache.get("length", 0))
        if cache is not None:
            k, v = append_to_cache(cache, k, v)
        o = attention(q, k, v, self.scale, mask)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, L, D))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = 1.0 / math.sqrt(dim // num_heads)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def __call__(self, x: mx.array, memory: mx.array, mask=None, cache: dict | None = None) -> mx.array:
        B, L, D = x.shape
        q = self.q_proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        if cache is not None and "k" in cache:
            # The memory never changes while decoding: project it once per question.
            k, v = cache["k"], cache["v"]
        else:
            S = memory.shape[1]
            k, v = mx.split(self.kv_proj(memory), 2, axis=-1)
            k, v = (t.reshape(B, S, self.num_heads, -1).transpose(0, 2, 1, 3) for t in (k, v))
            if cache is not None:  # stored contiguous: every decoding step reads them, and a strided
                k, v = mx.contiguous(k), mx.contiguous(v)  # view would be copied by each step's matmul
                cache["k"], cache["v"] = k, v
        o = attention(q, k, v, self.scale, mask)
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

    def __call__(self, x: mx.array, mask=None) -> mx.array:
        x = x + self.attn(self.attn_norm(x), mask)
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
    """A stack of encoder blocks over already-embedded tokens."""

    def __init__(self, dim: int, num_blocks: int, num_heads: int, checkpoint: bool = False):
        super().__init__()
        self.blocks = [EncoderBlock(dim, num_heads) for _ in range(num_blocks)]
        self.norm = nn.RMSNorm(dim)
        self.checkpoint = checkpoint

    def __call__(self, x: mx.array, mask=None) -> mx.array:
        for block in self.blocks:
            x = nn.utils.checkpoint(block)(x, mask) if self.checkpoint else block(x, mask)
        return self.norm(x)


def init_embedding(embedding: nn.Embedding, dim: int) -> None:
    """Scale token embeddings so that tied output logits start near zero."""
    embedding.weight = mx.random.normal(embedding.weight.shape) * (dim**-0.5)
