"""PyTorch twins of our retriever and FiD generator, for the benchmark only.

Same architecture as layers.py / retriever.py / generator.py: pre-norm RMSNorm blocks, fused QKV (and fused KV for
cross-attention), non-traditional RoPE, squared-ReLU MLP 4x, masked mean pooling, tied output embedding and the
pointer-generator copy head. Parameter names match MLX's `tree_flatten` names, so `load_flat` copies MLX weights in
and `figures.fig_train` checks that both frameworks give the same loss: if the MLX models change, that check fails.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PAD_ID, NEG_INF = 0, -1e9


def padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """Additive mask [B, 1, 1, L] from a boolean [B, L] array of real positions (as layers.padding_mask)."""
    return torch.where(valid, 0.0, NEG_INF)[:, None, None, :]


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """MLX's non-traditional RoPE (rotate the two halves of each head) on [B, H, L, Dh]."""
    L, dh = x.shape[-2], x.shape[-1]
    half = dh // 2
    inv = base ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = torch.arange(L, dtype=torch.float32, device=x.device)[:, None] * inv[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, mask):
        B, L, D = x.shape
        q, k, v = self.qkv_proj(x).split(D, dim=-1)
        q, k, v = (t.reshape(B, L, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        # SDPA's default scale is 1/sqrt(head_dim), as in layers.py.
        o = F.scaled_dot_product_attention(rope(q), rope(k), v, attn_mask=mask)
        return self.out_proj(o.transpose(1, 2).reshape(B, L, D))


class CrossAttention(nn.Module):
    """layers.CrossAttention as it trains: the memory's key/value projections folded into the queries and the
    outputs (the same function as projecting the memory, ~4x fewer multiply-adds; see layers.py)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, memory, mask):
        B, L, D = x.shape
        H = self.num_heads
        wk, wv = (w.reshape(H, -1, D) for w in self.kv_proj.weight.split(D, dim=0))
        q = (self.q_proj(x) * self.scale).reshape(B * L, H, -1).transpose(0, 1)
        q = (q @ wk).reshape(H, B, L, D).transpose(0, 1).reshape(B, H * L, D)
        read = (q @ memory.transpose(1, 2) + mask[:, 0]).softmax(-1) @ memory
        o = read.reshape(B, H, L, D).transpose(0, 1).reshape(H, B * L, D) @ wv.transpose(1, 2)
        return self.out_proj(o.transpose(0, 1).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.relu(self.up(x)).square())


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim, eps=1e-5)
        self.attn = SelfAttention(dim, num_heads)
        self.mlp_norm = nn.RMSNorm(dim, eps=1e-5)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, x, mask):
        x = x + self.attn(self.attn_norm(x), mask)
        return x + self.mlp(self.mlp_norm(x))


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.self_norm = nn.RMSNorm(dim, eps=1e-5)
        self.self_attn = SelfAttention(dim, num_heads)
        self.cross_norm = nn.RMSNorm(dim, eps=1e-5)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.mlp_norm = nn.RMSNorm(dim, eps=1e-5)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, x, memory, self_mask, memory_mask):
        x = x + self.self_attn(self.self_norm(x), self_mask)
        x = x + self.cross_attn(self.cross_norm(x), memory, memory_mask)
        return x + self.mlp(self.mlp_norm(x))


class Encoder(nn.Module):
    def __init__(self, dim: int, num_blocks: int, num_heads: int):
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(dim, num_heads) for _ in range(num_blocks))
        self.norm = nn.RMSNorm(dim, eps=1e-5)

    def forward(self, x, mask):
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


class Retriever(nn.Module):
    """retriever.Retriever: shared encoder, masked mean pooling, projection, L2 normalisation."""

    def __init__(self, vocab_size: int, dim: int, num_blocks: int, num_heads: int, embedding_dim: int = 128,
                 temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature
        self.embed = nn.Embedding(vocab_size, dim)
        self.encoder = Encoder(dim, num_blocks, num_heads)
        self.proj = nn.Linear(dim, embedding_dim, bias=False)

    def forward(self, tokens):
        valid = tokens != PAD_ID
        h = self.encoder(self.embed(tokens), padding_mask(valid))
        w = valid.to(h.dtype)[..., None]
        e = self.proj((h * w).sum(1) / w.sum(1).clamp_min(1.0))
        return e * torch.rsqrt((e * e).sum(-1, keepdim=True) + 1e-12)


def contrastive_loss(model: Retriever, questions, chunks, positive_mask):
    """retriever.contrastive_loss."""
    q, c = model(questions), model(chunks)
    scores = (q @ c.T) / model.temperature
    target = torch.arange(q.shape[0], device=q.device)
    eye = torch.arange(scores.shape[1], device=q.device)[None, :] == target[:, None]
    scores = torch.where(positive_mask & ~eye, NEG_INF, scores)
    loss = F.cross_entropy(scores, target)
    acc = (scores.argmax(1) == target).float().mean()
    return loss, acc


class Pointer(nn.Module):
    """generator.Pointer: copy attention over the memory positions and a copy/generate gate."""

    def __init__(self, dim: int):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Linear(dim, 1)
        self.scale = dim**-0.5

    def forward(self, h, states, mask):
        scores = ((self.q_proj(h) * self.scale) @ self.k_proj.weight) @ states.transpose(1, 2) + mask[:, 0]
        return scores.softmax(-1), torch.sigmoid(self.gate(h))


class Generator(nn.Module):
    """generator.Generator: FiD encoder over each passage, decoder with cross-attention, tied output,
    and (with `copy`) the pointer over the memory's tokens mixed into the output distribution."""

    def __init__(self, vocab_size: int, dim: int, num_blocks: int, num_decoder_blocks: int, num_heads: int,
                 copy: bool = True):
        super().__init__()
        self.copy = copy
        self.embed = nn.Embedding(vocab_size, dim)
        self.encoder = Encoder(dim, num_blocks, num_heads)
        self.blocks = nn.ModuleList(DecoderBlock(dim, num_heads) for _ in range(num_decoder_blocks))
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        if copy:
            self.pointer = Pointer(dim)

    def forward(self, passages, answer_in):
        B, P, L = passages.shape
        flat = passages.reshape(B * P, L)
        valid = flat != PAD_ID
        memory = self.encoder(self.embed(flat), padding_mask(valid)).reshape(B, P * L, -1)
        memory_mask = padding_mask(valid.reshape(B, P * L))
        x = self.embed(answer_in)
        T = x.shape[1]
        causal = torch.triu(torch.full((T, T), NEG_INF, device=answer_in.device), diagonal=1)
        for block in self.blocks:
            x = block(x, memory, causal, memory_mask)
        h = self.norm(x)
        logits = F.linear(h, self.embed.weight)
        if not self.copy:
            return logits.log_softmax(-1)
        attn, gate = self.pointer(h, memory, memory_mask)
        index = passages.reshape(B, 1, P * L).expand(B, T, P * L)
        copy = torch.zeros_like(logits).scatter_add(2, index, attn)
        return (1 - gate) * logits.softmax(-1) + gate * copy  # probabilities: the loss logs the targets' only


def target_log_probs(model: Generator, out, answer_out):
    """log p of each target token from `model`'s output (log-probs, or the copy mixture's probabilities, whose
    log is taken of the targets alone, as generator._answer_sums does)."""
    picked = out.gather(-1, answer_out[..., None]).squeeze(-1)
    return torch.log(picked + 1e-9) if model.copy else picked


def seq2seq_loss(model: Generator, passages, answer_in, answer_out):
    """generator.seq2seq_loss: mean negative log-likelihood over non-PAD targets."""
    out = model(passages, answer_in)
    mask = answer_out != PAD_ID
    nll = -target_log_probs(model, out, answer_out)
    ntok = mask.sum().clamp_min(1)
    loss = (nll * mask).sum() / ntok
    acc = ((out.argmax(-1) == answer_out) & mask).sum() / ntok  # log is monotone: the same argmax
    return loss, acc


def load_flat(model: nn.Module, flat: dict[str, np.ndarray]) -> None:
    """Copy weights named as MLX's tree_flatten names them; names and shapes must match exactly."""
    own = dict(model.named_parameters())
    if set(own) != set(flat):
        raise ValueError(f"parameter names differ: only torch {sorted(set(own) - set(flat))[:5]}, "
                         f"only MLX {sorted(set(flat) - set(own))[:5]}")
    with torch.no_grad():
        for name, p in own.items():
            if tuple(p.shape) != tuple(flat[name].shape):
                raise ValueError(f"{name}: torch shape {tuple(p.shape)} != MLX {flat[name].shape}")
            p.copy_(torch.from_numpy(np.ascontiguousarray(flat[name])))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
