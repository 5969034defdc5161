"""A Llama-style decoder block (Touvron et al. 2023): RMSNorm, rotary positions, grouped-query attention, SwiGLU.

Dense reference on ``[batch, seq, d_model]``, no biases::

    x = x + attn(ln1(x), positions)     attn: q, k, v → RoPE on q and k → causal GQA → o
    x = x + mlp(ln2(x))                 mlp = down(silu(gate(·)) · up(·))   (SwiGLU, Shazeer 2020)

``ln1`` and ``ln2`` are RMSNorms, named like ``TransformerBlock``'s LayerNorms so that
``ParallelTransformerBlock`` serves both blocks. Grouped-query attention (Ainslie et al. 2023):
n_heads query heads share n_kv_heads K/V heads, query head i reading K/V head i // (n_heads / n_kv_heads).

RoPE (Su et al. 2021, eq. 34) rotates each head's feature pairs (i, i + d/2) — the "rotate half"
layout of GPT-NeoX and Hugging Face Llama — by the angle position · theta^(-2i/d). It needs each
token's *global* position: under context parallelism a rank's tokens are not positions 0, 1, ...
(``ts.sequence_positions`` gives them).

The attention modules take the attention itself as a function ``attention(q, k, v)`` on
``[batch, heads, seq, head_dim]`` (causal dense attention by default), so ring or Ulysses attention
can replace it; they receive q and k already rotated.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import acc_dtype, dense_attention

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight over the last dim (Zhang & Sennrich 2019): no centring, no bias."""

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d_model)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """x rotated by its tokens' positions: x·cos + rotate_half(x)·sin, angle_i = position · theta^(-2i/d).

    ``x``: ``[..., seq, head_dim]`` (head_dim even); ``positions``: ``[seq]`` global token positions.
    Computed in float32 for 16-bit inputs.
    """
    n, d = x.shape[-2:]
    if d % 2:
        raise ValueError(f"rope: head_dim must be even (pairs of features are rotated), got {d}")
    if positions.shape != (n,):
        raise ValueError(f"rope: need one position per token, got positions of shape {tuple(positions.shape)} "
                         f"for {n} tokens (x of shape {tuple(x.shape)})")
    dtype = acc_dtype(x.dtype)
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=dtype, device=x.device) / d)
    angles = positions.to(device=x.device, dtype=dtype)[:, None] * inv_freq  # [seq, d/2]
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    wide = x.to(dtype)
    first, second = wide.chunk(2, -1)
    return (wide * cos + torch.cat([-second, first], -1) * sin).to(x.dtype)


def rotary_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None,
                     head_dim: int, theta: float, attention: Attention) -> torch.Tensor:
    """Projections ``[b, s, heads·d]`` → heads, RoPE on q and k, ``attention``, back to ``[b, s, heads·d]``.
    ``positions`` defaults to 0, 1, ..., s-1 (the tokens are the whole sequence, in order)."""
    q, k, v = (y.unflatten(-1, (-1, head_dim)).transpose(1, 2) for y in (q, k, v))  # [b, heads, s, d]
    if positions is None:
        positions = torch.arange(q.shape[2], device=q.device)
    out = attention(rope(q, positions, theta), rope(k, positions, theta), v)
    return out.transpose(1, 2).flatten(2)


class _RotaryAttention(nn.Module):
    """o(attention(rope(q), rope(k), v)); subclasses say where q, k, v come from (``project``)."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, rope_theta: float, causal: bool,
                 attention: Attention | None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope_theta, self.causal = rope_theta, causal
        self.attention = attention or partial(dense_attention, causal=causal)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project(x)
        return self.o(rotary_attention(q, k, v, positions, self.head_dim, self.rope_theta, self.attention))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, causal={self.causal}"


class LlamaAttention(_RotaryAttention):
    """Dense grouped-query attention: projections q (n_heads·d), k and v (n_kv_heads·d each), o; no biases."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, rope_theta: float = 10000.0,
                 causal: bool = True, attention: Attention | None = None) -> None:
        head_dim = d_model // n_heads
        super().__init__(n_heads, n_kv_heads, head_dim, rope_theta, causal, attention)
        self.q = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.o = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q(x), self.k(x), self.v(x)


class FusedQKVAttention(_RotaryAttention):
    """The same attention from one layer ``qkv`` whose output features are [q | k | v] (under TP: this
    rank's n_heads query heads and n_kv_heads K/V heads), then ``o``."""

    def __init__(self, qkv: nn.Module, o: nn.Module, n_heads: int, n_kv_heads: int, head_dim: int,
                 rope_theta: float, causal: bool, attention: Attention | None = None) -> None:
        super().__init__(n_heads, n_kv_heads, head_dim, rope_theta, causal, attention)
        self.qkv, self.o = qkv, o

    @classmethod
    def from_dense(cls, dense: LlamaAttention, qkv: nn.Module, o: nn.Module, tp_size: int = 1,
                   attention: Attention | None = None) -> "FusedQKVAttention":
        """``dense`` (a ``LlamaAttention``) on one of ``tp_size`` tensor-parallel ranks, from that rank's
        layers: ``qkv`` gives its n_heads/t query heads then its K/V heads (n_kv_heads/t of them, or one
        replica when t > n_kv_heads), ``o`` reads its query heads' outputs. Head size, RoPE base and mask
        are the dense layer's."""
        t, heads, kv_heads = tp_size, dense.n_heads, dense.n_kv_heads
        if t < 1 or heads % t or (kv_heads % t and t % kv_heads):
            raise ValueError(f"FusedQKVAttention.from_dense: {heads} query heads and {kv_heads} K/V heads cannot be "
                             f"split over tp_size={t} ranks (t must divide the query heads, and divide the K/V "
                             f"heads or be a multiple of them)")
        return cls(qkv, o, heads // t, max(kv_heads // t, 1), dense.head_dim, dense.rope_theta, dense.causal,
                   attention)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d = self.head_dim
        return self.qkv(x).split([self.n_heads * d, self.n_kv_heads * d, self.n_kv_heads * d], -1)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x)), no biases."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class FusedSwiGLU(nn.Module):
    """down(silu(gate) · up) from one layer ``gate_up`` whose output features are [gate | up]."""

    def __init__(self, gate_up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.gate_up, self.down = gate_up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, -1)
        return self.down(F.silu(gate) * up)


def llama_d_ff(d_model: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4·d_model (same parameters as a 4·d_model GELU MLP), rounded up to ``multiple_of``."""
    return -(-int(8 * d_model / 3) // multiple_of) * multiple_of


class LlamaBlock(nn.Module):
    """Dense pre-RMSNorm Llama block on ``[batch, seq, d_model]``: ``block(x, positions=None)``.

    ``positions``: the global position of each of the ``seq`` tokens (default 0 .. seq-1).
    ``d_ff`` defaults to ``llama_d_ff(d_model)``; ``n_kv_heads`` to ``n_heads`` (multi-head attention).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, d_ff: int | None = None,
                 rope_theta: float = 10000.0, norm_eps: float = 1e-5, causal: bool = True) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"LlamaBlock: d_model={d_model} must split into n_heads={n_heads} heads of even size")
        if n_heads % n_kv_heads:
            raise ValueError(f"LlamaBlock: n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.d_ff, self.causal = d_ff or llama_d_ff(d_model), causal
        self.ln1 = RMSNorm(d_model, norm_eps)
        self.attn = LlamaAttention(d_model, n_heads, n_kv_heads, rope_theta, causal)
        self.ln2 = RMSNorm(d_model, norm_eps)
        self.mlp = SwiGLU(d_model, self.d_ff)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), positions)
        return x + self.mlp(self.ln2(x))
