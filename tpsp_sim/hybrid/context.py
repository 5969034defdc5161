"""Hybrid parallelism in one block: TP+SP over ``tp`` × context parallelism over ``cp`` (any registered kind).

``ParallelTransformerBlock.from_dense(dense, tp=mesh["tp"], cp=mesh["cp"], mode="tp_sp",
attention="ring", layout="zigzag")`` builds the usual TP(+SP) block over ``tp`` and replaces its
attention with a context-parallel one over ``cp`` (Megatron-LM's TP × CP; Llama 3's 128K stage). The
kinds ("ring", "ulysses", "usp", "allgather", and any registered) come from
``ts.context_parallel.registry``; each says which communicators it uses and what it moves.

Order of the USP pair: ``cp=(ulysses, ring)`` — the Ulysses communicator first, the ring second (as
``usp_attention(q, k, v, ulysses, ring)``). The mesh is laid out the other way round, outer to inner:
``ts.plan`` builds ``("cp_ring", "cp_ulysses", "tp")`` (tp innermost, then the Ulysses group, so a
Ulysses group is neighbouring ranks, inside a node) and passes ``cp=(mesh["cp_ulysses"],
mesh["cp_ring"])``.

Tokens. The sequence is cut over cp first, ``usp_shard_sequence`` for every kind: "ring" and
"allgather": ``shard_sequence(layout)`` over the cp ranks; "ulysses": contiguous pieces (no ring;
``layout`` does not apply); "usp", with ``cp=(ulysses, ring)``: the ring's ``layout``, then contiguous
over the Ulysses group — then, under "tp_sp", each cp piece contiguously over tp. ``hybrid_positions`` gives
the global positions of a rank's tokens, ``shard_hybrid`` its piece of a full tensor. The column
layers all-gather the cp piece over tp, so the attention sees the whole cp piece for heads/t heads,
in order; Llama's RoPE gets those tokens' global positions (``context_positions``).

Bytes per rank per block, with E = b·(s/cp)·h elements of the cp piece (h = d_model), e bytes each,
e_acc the accumulation size (= e in float32/64), E_q = E/t elements of this rank's q after the tp
gather and E_kv = E_q·n_kv/n_heads of its K (= V) (GPT: n_kv = n_heads; Llama with t > n_kv, where
each rank holds one replicated K/V head: E_kv = E/n_heads):

    tp  (TP+SP)              forward 4(t-1)/t·E·e        backward 6(t-1)/t·E·e (+ the K/V replicas'
                             weight-gradient all-reduce when n_kv < t; tensor_parallel/blocks.py)
    cp  ring                 forward (cp-1)·2E_kv·e      backward (cp-1)·2E_kv·e + cp·2E_kv·e_acc
        ulysses (u = cp)     forward (u-1)/u·(2E_q + 2E_kv)·e, backward the same
        usp (u·r = cp)       ulysses axis as Ulysses on u, ring axis as ring on r (usp.py)
        allgather            forward (cp-1)·2E_kv·e      backward (cp-1)·2E_kv·e_acc (allgather.py)

(each kind's ``wire_bytes``, with ``LocalShape(b, H/t, max(n_kv/t, 1), s/cp, d)``)

and per step, from ``sync_gradients`` (data_parallel.py): 2(t-1)/t·P_sp·e on tp (the P_sp elements of
sequence-parallel parameters) and 2(n-1)/n·P·e on the n = dp·cp replicas (P: this rank's parameters).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from ..context_parallel.attention import check_layout
from ..context_parallel.registry import attention_kind
from ..context_parallel.usp import usp_shard_sequence
from ..core.comm import Comm
from ..models.llama import FusedQKVAttention
from ..tensor_parallel.sharding import SEQUENCE_DIM

ContextGroup = Comm | tuple[Comm, Comm]


def context_groups(cp: ContextGroup, attention: str) -> tuple[Comm | None, Comm | None]:
    """(ulysses, ring) communicators of ``cp`` for ``attention`` (None where the kind has no such group):
    one communicator for a kind with one group, the pair ``(ulysses, ring)`` for one with both."""
    groups = attention_kind(attention).groups
    if len(groups) == 2:
        if not (isinstance(cp, tuple) and len(cp) == 2 and all(isinstance(c, Comm) for c in cp)):
            raise ValueError(f"attention={attention!r} needs cp=(ulysses, ring), two communicators; got {cp!r}")
        return cp
    if not isinstance(cp, Comm):
        raise ValueError(f"attention={attention!r} needs cp to be one communicator, got {cp!r}")
    return (cp, None) if groups == ("ulysses",) else (None, cp)


def context_positions(seq_len: int, cp: ContextGroup, attention: str = "ring", layout: str = "zigzag") -> torch.Tensor:
    """Global positions of the tokens this rank's attention sees (its cp piece, in order)."""
    check_layout(layout)
    ulysses, ring = context_groups(cp, attention)
    u_rank, u = (ulysses.rank, ulysses.world_size) if ulysses else (0, 1)
    r_rank, r = (ring.rank, ring.world_size) if ring else (0, 1)
    return usp_shard_sequence(torch.arange(seq_len), u_rank, u, r_rank, r, dim=0,
                              layout=layout if ring else "contiguous")


def hybrid_positions(seq_len: int, tp: Comm, cp: ContextGroup, attention: str = "ring", layout: str = "zigzag", *,
                     sequence_parallel: bool = True) -> torch.Tensor:
    """Global positions of this rank's residual-stream tokens: its cp piece, then (SP) its tp chunk of it."""
    positions = context_positions(seq_len, cp, attention, layout)
    if not sequence_parallel:
        return positions
    if len(positions) % tp.world_size:
        raise ValueError(f"rank {tp.rank}: the cp piece of {len(positions)} tokens (of {seq_len}) does not split "
                         f"over t={tp.world_size} tensor-parallel ranks")
    return positions.chunk(tp.world_size)[tp.rank].clone()


def shard_hybrid(x: torch.Tensor, tp: Comm, cp: ContextGroup, attention: str = "ring", layout: str = "zigzag", *,
                 sequence_parallel: bool = True, dim: int = SEQUENCE_DIM) -> torch.Tensor:
    """This rank's piece of the full-sequence tensor ``x`` (its tokens, ``hybrid_positions``, along ``dim``)."""
    positions = hybrid_positions(x.shape[dim], tp, cp, attention, layout, sequence_parallel=sequence_parallel)
    return x.index_select(dim, positions.to(x.device))


def _attention_fn(cp: ContextGroup, attention: str, layout: str, causal: bool) -> Callable:
    ulysses, ring = context_groups(cp, attention)
    return partial(attention_kind(attention).attend, ulysses=ulysses, ring=ring, causal=causal, layout=layout)


class ContextParallelRotaryAttention(FusedQKVAttention):
    """Llama attention over a cp piece: RoPE at the piece's global positions (``context_positions``)."""

    def __init__(self, attn: FusedQKVAttention, cp: ContextGroup, attention: str, layout: str,
                 tokens_per_input_token: int) -> None:
        super().__init__(attn.qkv, attn.o, attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.rope_theta,
                         attn.causal, _attention_fn(cp, attention, layout, attn.causal))
        self.cp, self.kind, self.layout = cp, attention, layout
        ulysses, ring = context_groups(cp, attention)
        self.cp_size = (ulysses.world_size if ulysses else 1) * (ring.world_size if ring else 1)
        self.tokens_per_input_token = tokens_per_input_token  # t under SP (the column layer gathers), else 1

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            seq_len = x.shape[SEQUENCE_DIM] * self.tokens_per_input_token * self.cp_size
            positions = context_positions(seq_len, self.cp, self.kind, self.layout)
        return super().forward(x, positions)


def context_parallel_attention(attn: nn.Module, cp: ContextGroup, attention: str, layout: str, *,
                               dropouts: tuple[float, ...], tp: Comm, sequence_parallel: bool) -> nn.Module:
    """``attn`` (a block's tensor-parallel attention) with its attention run over ``cp``.

    GPT ``SelfAttention``: its ``attention`` function is set; Llama ``FusedQKVAttention``: rebuilt as
    ``ContextParallelRotaryAttention``. Dropout is not supported (ring attention has none).
    """
    check_layout(layout)
    context_groups(cp, attention)  # checks the kind and the groups
    attn_dropout = getattr(getattr(attn, "attn_drop", None), "p", 0.0)
    if any(dropouts) or attn_dropout:
        raise ValueError(f"rank {tp.rank}: context-parallel attention has no dropout; the block has residual dropout "
                         f"{dropouts} and attention dropout {attn_dropout}")
    if isinstance(attn, FusedQKVAttention):
        return ContextParallelRotaryAttention(attn, cp, attention, layout, tp.world_size if sequence_parallel else 1)
    attn.attention = _attention_fn(cp, attention, layout, attn.causal)
    return attn
