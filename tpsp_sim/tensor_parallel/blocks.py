"""The dense reference transformer block, and its tensor- and sequence-parallel twin.

Dense (pre-LayerNorm GPT block) on ``[batch, seq, d_model]``::

    x = x + drop(attn(ln1(x)))
    x = x + drop(mlp(ln2(x)))          mlp = fc2(gelu(fc1(·))), d_ff = 4·d_model by default

``ParallelTransformerBlock.from_dense(block, comm, mode)`` runs the same computation on t ranks
with the same parameter names, each parameter an exact slice of the dense one:

* ``"tp"`` (Shoeybi et al. 2019): x is whole on every rank. attn.qkv and mlp.fc1 are column
  layers (f before), attn.proj and mlp.fc2 row layers (f̄ after): each rank runs its n_heads/t
  heads and d_ff/t MLP features. Forward: 2 all-reduces per block; backward: 2 (the f's).
* ``"tp_sp"`` (Korthikanti et al. 2022): x is this rank's contiguous chunk of the sequence (dim 1).
  LayerNorms, dropouts and residuals run on the chunk; g (all-gather) replaces f and ḡ
  (reduce-scatter) replaces f̄. Forward: 2 all-gathers + 2 reduce-scatters, the same bytes as 2
  all-reduces; backward: the mirror image plus the 2 all-gathers that rebuild the saved input shards.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.comm import Comm
from .layers import (SEQUENCE_DIM, ColumnParallelLinear, Dropout, DropoutRNG, RowParallelLinear, replicate)

MODES = ("tp", "tp_sp")


class SelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d) + causal mask) V, dropout on the probabilities, then ``proj``.

    Fused qkv layout (GPT-2's c_attn, nanoGPT): the output features of ``qkv`` are [q | k | v],
    each ordered [heads, head_dim]. Runs on as many heads as ``qkv`` produces: all of them dense,
    this rank's under TP (where ``qkv`` is split per head with stride 3).
    """

    def __init__(self, qkv: nn.Module, proj: nn.Module, head_dim: int, causal: bool, attn_drop: Dropout) -> None:
        super().__init__()
        self.qkv, self.proj, self.attn_drop = qkv, proj, attn_drop
        self.head_dim, self.causal = head_dim, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, -1, self.head_dim)).permute(2, 0, 3, 1, 4)  # 3 x [b, heads, s, d]
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if self.causal:  # additive mask: saves nothing for backward (masked_fill would save an s x s mask)
            s = scores.shape[-1]
            scores = scores + torch.full((s, s), float("-inf"), dtype=scores.dtype, device=scores.device).triu(1)
        probs = self.attn_drop(scores.softmax(-1))
        return self.proj((probs @ v).transpose(1, 2).flatten(2))  # heads back to features: [b, s, heads * d]


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


class ParallelTransformerBlock(nn.Module):
    """One rank's part of a ``TransformerBlock`` (build with ``from_dense``); see the module docstring.

    Parameter names are the dense block's, so ``ts.gather_dense_grads(block)`` compares directly
    with ``dense.named_parameters()``. Under ``"tp_sp"`` call ``ts.sync_sequence_parallel_grads(block,
    comm)`` after backward (LayerNorm weights and row biases see only this rank's tokens).
    """

    def __init__(self, comm: Comm, mode: str, rng: DropoutRNG, ln1: nn.Module, attn: SelfAttention, drop1: Dropout,
                 ln2: nn.Module, mlp: MLP, drop2: Dropout) -> None:
        super().__init__()
        self.comm, self.mode, self.rng = comm, mode, rng
        self.ln1, self.attn, self.drop1, self.ln2, self.mlp, self.drop2 = ln1, attn, drop1, ln2, mlp, drop2

    @classmethod
    def from_dense(cls, block: TransformerBlock, comm: Comm, mode: str, *, seed: int = 0,
                   exact_dropout: bool = False) -> "ParallelTransformerBlock":
        """Slice ``block`` for this rank. Dropout: masks of sharded tensors from this rank's own stream
        (seed, rank); with ``exact_dropout`` the dense block's masks for ``block.manual_seed(seed)``."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        t = comm.world_size
        for name, size in (("n_heads", block.n_heads), ("d_ff", block.d_ff)):
            if size % t:
                raise ValueError(f"rank {comm.rank}: {name}={size} is not divisible by the tensor-parallel size t={t}")
        sp = mode == "tp_sp"
        rng = DropoutRNG(seed, comm, exact_dropout)
        seq = SEQUENCE_DIM if sp else None  # residual-stream tensors: sequence shards under SP, whole under TP
        attn = SelfAttention(
            ColumnParallelLinear.from_dense(block.attn.qkv, comm, sequence_parallel=sp, stride=3),  # q, k, v of my heads
            RowParallelLinear.from_dense(block.attn.proj, comm, sequence_parallel=sp),
            block.attn.head_dim, block.causal, Dropout(block.attn.attn_drop.p, rng, shard_dim=1))  # heads are split
        mlp = MLP(ColumnParallelLinear.from_dense(block.mlp.fc1, comm, sequence_parallel=sp),
                  RowParallelLinear.from_dense(block.mlp.fc2, comm, sequence_parallel=sp))
        parallel = cls(comm, mode, rng, replicate(block.ln1, sequence_parallel=sp), attn, Dropout(block.drop1.p, rng, seq),
                       replicate(block.ln2, sequence_parallel=sp), mlp, Dropout(block.drop2.p, rng, seq))
        return parallel.train(block.training)

    def manual_seed(self, seed: int) -> "ParallelTransformerBlock":
        """Restart both dropout streams from ``seed`` (the shared one, and this rank's own)."""
        self.rng.manual_seed(seed)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.comm.scope("attn"):
            x = x + self.drop1(self.attn(self.ln1(x)))
        with self.comm.scope("mlp"):
            return x + self.drop2(self.mlp(self.ln2(x)))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, world_size={self.comm.world_size}"
