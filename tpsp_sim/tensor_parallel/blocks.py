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

``from_dense`` also takes a ``LlamaBlock`` (llama.py): q, k, v become one fused, head-aware column
layer ``attn.qkv`` and gate, up one ``mlp.gate_up``, so the collectives are the GPT block's. Per
rank, with E = b·s·h elements of the block's input (whole sequence) of e bytes each:

    "tp"     forward 2 all-reduces of E: 4(t-1)/t·E·e;  backward the same (the two f's)
    "tp_sp"  forward 2 all-gathers + 2 reduce-scatters: 4(t-1)/t·E·e;
             backward 2 reduce-scatters + 4 all-gathers:  6(t-1)/t·E·e

plus, in backward, when n_kv_heads < t, one all-reduce of the replicated K/V rows' weight gradient
over the g = t/n_kv_heads ranks sharing a K/V head: 2(g-1)/g · 2·h·d_head·e (layers.py). One column
layer per projection instead (q, k, v, gate, up) would add 3 f's in "tp" backward (5 all-reduces
instead of 2), and in "tp_sp" 3 all-gathers in forward and 3 reduce-scatters + 3 all-gathers in
backward. ``positions`` (``forward(x, positions)``): the global positions of the tokens the
attention sees — the whole sequence under "tp" and "tp_sp" (the column layer gathers it), so the
default 0 .. s-1 is right for both.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..core.comm import Comm
from .layers import (SEQUENCE_DIM, ColumnParallelLinear, Dropout, DropoutRNG, RowParallelLinear, replicate)
from .llama import FusedQKVAttention, FusedSwiGLU, LlamaBlock
from .hybrid import context_parallel_attention

MODES = ("tp", "tp_sp")


class SelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d) + causal mask) V, dropout on the probabilities, then ``proj``.

    Fused qkv layout (GPT-2's c_attn, nanoGPT): the output features of ``qkv`` are [q | k | v],
    each ordered [heads, head_dim]. Runs on as many heads as ``qkv`` produces: all of them dense,
    this rank's under TP (where ``qkv`` is split per head with stride 3).
    """

    attention: Callable | None = None  # replaces the dense softmax of ``attend`` (hybrid.py)

    def __init__(self, qkv: nn.Module, proj: nn.Module, head_dim: int, causal: bool, attn_drop: Dropout) -> None:
        super().__init__()
        self.qkv, self.proj, self.attn_drop = qkv, proj, attn_drop
        self.head_dim, self.causal = head_dim, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, -1, self.head_dim)).permute(2, 0, 3, 1, 4)  # 3 x [b, heads, s, d]
        return self.proj(self.attend(q, k, v).transpose(1, 2).flatten(2))  # heads back to features: [b, s, heads * d]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention itself on [b, heads, s, d]: ``self.attention(q, k, v)`` when set (context parallelism,
        hybrid.py), else the dense softmax with dropout on the probabilities."""
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


class ParallelTransformerBlock(nn.Module):
    """One rank's part of a ``TransformerBlock`` or ``LlamaBlock`` (build with ``from_dense``); see the module docstring.

    Parameter names are the dense block's, so ``ts.gather_dense_grads(block)`` compares directly
    with ``dense.named_parameters()``. Under ``"tp_sp"`` call ``ts.sync_sequence_parallel_grads(block,
    comm)`` after backward (LayerNorm weights and row biases see only this rank's tokens).
    """

    def __init__(self, comm: Comm, mode: str, rng: DropoutRNG, ln1: nn.Module, attn: nn.Module, drop1: Dropout,
                 ln2: nn.Module, mlp: nn.Module, drop2: Dropout) -> None:
        super().__init__()
        self.comm, self.mode, self.rng = comm, mode, rng
        self.ln1, self.attn, self.drop1, self.ln2, self.mlp, self.drop2 = ln1, attn, drop1, ln2, mlp, drop2

    @classmethod
    def from_dense(cls, block: TransformerBlock | LlamaBlock, comm: Comm | None = None, mode: str | None = None, *,
                   tp: Comm | None = None, cp: Comm | tuple[Comm, Comm] | None = None, attention: str = "ring",
                   layout: str = "zigzag", seed: int = 0, exact_dropout: bool = False) -> "ParallelTransformerBlock":
        """Slice ``block`` for this rank. Dropout: masks of sharded tensors from this rank's own stream
        (seed, rank); with ``exact_dropout`` the dense block's masks for ``block.manual_seed(seed)``.

        ``tp`` is another name for ``comm``. With ``cp`` the attention runs context-parallel over it
        (``attention`` "ring", "ulysses", or "usp" with ``cp=(ulysses, ring)``; hybrid.py).

        ``mode`` is required for the tensor-parallel block alone (``"tp"`` and ``"tp_sp"`` are the two
        lessons, neither a silent default); with ``cp`` it defaults to ``"tp_sp"`` (Megatron-LM's
        context parallelism runs with sequence parallelism)."""
        comm = _tensor_comm(comm, tp)
        if mode is None and cp is not None:
            mode = "tp_sp"
        if mode not in MODES:
            raise ValueError(f"rank {comm.rank}: ParallelTransformerBlock.from_dense: mode must be one of {MODES}"
                             f"{'' if cp is not None else ' (required without cp)'}, got {mode!r}")
        sp = mode == "tp_sp"
        rng = DropoutRNG(seed, comm, exact_dropout)
        seq = SEQUENCE_DIM if sp else None  # residual-stream tensors: sequence shards under SP, whole under TP
        if isinstance(block, LlamaBlock):
            (attn, mlp), drops = _llama_sublayers(block, comm, sp), (0.0, 0.0)  # Llama has no dropout
        else:
            (attn, mlp), drops = _gpt_sublayers(block, comm, sp, rng), (block.drop1.p, block.drop2.p)
        if cp is not None:
            attn = context_parallel_attention(attn, cp, attention, layout, dropouts=drops, tp=comm, sequence_parallel=sp)
        parallel = cls(comm, mode, rng, replicate(block.ln1, sequence_parallel=sp), attn, Dropout(drops[0], rng, seq),
                       replicate(block.ln2, sequence_parallel=sp), mlp, Dropout(drops[1], rng, seq))
        return parallel.train(block.training)

    def manual_seed(self, seed: int) -> "ParallelTransformerBlock":
        """Restart both dropout streams from ``seed`` (the shared one, and this rank's own)."""
        self.rng.manual_seed(seed)
        return self

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``positions`` (Llama blocks only): global positions of the tokens the attention sees."""
        with self.comm.scope("attn"):
            h = self.ln1(x)
            x = x + self.drop1(self.attn(h) if positions is None else self.attn(h, positions))
        with self.comm.scope("mlp"):
            return x + self.drop2(self.mlp(self.ln2(x)))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, world_size={self.comm.world_size}"


def _tensor_comm(comm: Comm | None, tp: Comm | None) -> Comm:
    if (comm is None) == (tp is None):
        raise ValueError("ParallelTransformerBlock.from_dense needs the tensor-parallel comm once: as comm or as tp=")
    return comm if tp is None else tp


def _check_divisible(comm: Comm, sizes: tuple[tuple[str, int], ...]) -> None:
    for name, size in sizes:
        if size % comm.world_size:
            raise ValueError(f"rank {comm.rank}: {name}={size} is not divisible by the tensor-parallel size "
                             f"t={comm.world_size}")


def _gpt_sublayers(block: TransformerBlock, comm: Comm, sp: bool, rng: DropoutRNG) -> tuple[nn.Module, nn.Module]:
    """attn: qkv column (stride 3: q, k, v of my heads) + proj row; mlp: fc1 column + fc2 row."""
    _check_divisible(comm, (("n_heads", block.n_heads), ("d_ff", block.d_ff)))
    attn = SelfAttention(
        ColumnParallelLinear.from_dense(block.attn.qkv, comm, sequence_parallel=sp, stride=3),
        RowParallelLinear.from_dense(block.attn.proj, comm, sequence_parallel=sp),
        block.attn.head_dim, block.causal, Dropout(block.attn.attn_drop.p, rng, shard_dim=1))  # heads are split
    mlp = MLP(ColumnParallelLinear.from_dense(block.mlp.fc1, comm, sequence_parallel=sp),
              RowParallelLinear.from_dense(block.mlp.fc2, comm, sequence_parallel=sp))
    return attn, mlp


def _llama_sublayers(block: LlamaBlock, comm: Comm, sp: bool) -> tuple[nn.Module, nn.Module]:
    """attn: fused head-aware [q | k | v] column (K/V heads replicated when n_kv_heads < t) + o row;
    mlp: fused [gate | up] column + down row."""
    t, a = comm.world_size, block.attn
    _check_divisible(comm, (("n_heads", a.n_heads), ("d_ff", block.d_ff)))
    if a.n_kv_heads % t and t % a.n_kv_heads:
        raise ValueError(f"rank {comm.rank}: attn.qkv: n_kv_heads={a.n_kv_heads} K/V heads can be neither split "
                         f"over nor replicated on t={t} ranks (one must divide the other)")
    qkv = ColumnParallelLinear.from_dense([a.q, a.k, a.v], comm, sequence_parallel=sp,
                                          heads=(a.n_heads, a.n_kv_heads, a.n_kv_heads), names=("q", "k", "v"))
    attn = FusedQKVAttention(qkv, RowParallelLinear.from_dense(a.o, comm, sequence_parallel=sp),
                             a.n_heads // t, max(a.n_kv_heads // t, 1), a.head_dim, a.rope_theta, a.causal)
    gate_up = ColumnParallelLinear.from_dense([block.mlp.gate, block.mlp.up], comm, sequence_parallel=sp,
                                              names=("gate", "up"))
    return attn, FusedSwiGLU(gate_up, RowParallelLinear.from_dense(block.mlp.down, comm, sequence_parallel=sp))
