"""The dense reference GPT block (pre-LayerNorm), on ``[batch, seq, d_model]``::

    x = x + drop(attn(ln1(x)))
    x = x + drop(mlp(ln2(x)))          mlp = fc2(gelu(fc1(·))), d_ff = 4·d_model by default
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .dropout import Dropout, DropoutRNG


class SelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d) + causal mask) V, dropout on the probabilities, then ``proj``.

    Fused qkv layout (GPT-2's c_attn, nanoGPT): the output features of ``qkv`` are [q | k | v],
    each ordered [heads, head_dim]. Runs on as many heads as ``qkv`` produces: all of them dense,
    this rank's under TP (where ``qkv`` is split per head with stride 3).
    """

    attention: Callable | None = None  # replaces the dense softmax of ``attend`` (hybrid/context.py)
    recompute_core: bool = False  # selective recompute (Korthikanti et al. 2022, §5): see ``recomputed_attend``

    def __init__(self, qkv: nn.Module, proj: nn.Module, head_dim: int, causal: bool, attn_drop: Dropout) -> None:
        super().__init__()
        self.qkv, self.proj, self.attn_drop = qkv, proj, attn_drop
        self.head_dim, self.causal = head_dim, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, -1, self.head_dim)).permute(2, 0, 3, 1, 4)  # 3 x [b, heads, s, d]
        core = self.recomputed_attend if self.recompute_core else self.attend
        return self.proj(core(q, k, v).transpose(1, 2).flatten(2))  # heads back to features: [b, s, heads * d]

    def recomputed_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``attend`` keeping only q, k, v for backward, which runs it again (``torch.utils.checkpoint``):
        the s x s scores, probabilities and dropout mask (5as²b bytes per layer) are never stored. The
        recomputation draws the same dropout mask: the dropout's generators are set back to their state
        at the forward for it, then restored (checkpoint itself restores only torch's global generator)."""
        if self.attention is not None:
            raise ValueError("recompute_core recomputes the dense attention core; a context-parallel attention "
                             "(self.attention) would repeat its communication in backward")
        generators = [g for g in (self.attn_drop.rng.default, self.attn_drop.rng.model_parallel) if g is not None]
        at_forward = [g.get_state() for g in generators]
        calls = []

        def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            calls.append(None)
            if len(calls) == 1:  # the forward: draw as usual
                return self.attend(q, k, v)
            now = [g.get_state() for g in generators]  # the recomputation: replay the forward's draws
            for g, state in zip(generators, at_forward):
                g.set_state(state)
            try:
                return self.attend(q, k, v)
            finally:
                for g, state in zip(generators, now):
                    g.set_state(state)

        return checkpoint(core, q, k, v, use_reentrant=False)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention itself on [b, heads, s, d]: ``self.attention(q, k, v)`` when set (context parallelism,
        hybrid/context.py), else the dense softmax with dropout on the probabilities."""
        if self.attention is not None:
            return self.attention(q, k, v)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if self.causal:  # additive mask: saves nothing for backward (masked_fill would save an s x s mask)
            s = scores.shape[-1]
            scores = scores + torch.full((s, s), float("-inf"), dtype=scores.dtype, device=scores.device).triu(1)
        return self.attn_drop(scores.softmax(-1)) @ v


class MLP(nn.Module):
    """fc2(gelu(fc1(x)))."""

    def __init__(self, fc1: nn.Module, fc2: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, nn.GELU(), fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Dense pre-LayerNorm GPT block on ``[batch, seq, d_model]``: the reference every parallel run must equal.

    Dropout masks come from ``self.rng``: torch's global generator until ``manual_seed(seed)``,
    after which they are the masks a ``ParallelTransformerBlock`` with the same seed and
    ``exact_dropout=True`` draws.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int | None = None, dropout: float = 0.0,
                 attn_dropout: float = 0.0, causal: bool = True) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.d_ff, self.causal = d_model, n_heads, d_ff or 4 * d_model, causal
        self.rng = DropoutRNG()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model), d_model // n_heads,
                                  causal, Dropout(attn_dropout, self.rng))
        self.drop1 = Dropout(dropout, self.rng)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(nn.Linear(d_model, self.d_ff), nn.Linear(self.d_ff, d_model))
        self.drop2 = Dropout(dropout, self.rng)

    def manual_seed(self, seed: int) -> "TransformerBlock":
        """Draw the dropout masks from a generator seeded with ``seed``."""
        self.rng.manual_seed(seed)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop1(self.attn(self.ln1(x)))
        return x + self.drop2(self.mlp(self.ln2(x)))
