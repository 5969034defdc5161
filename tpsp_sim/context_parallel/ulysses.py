"""Ulysses attention (Jacobs et al. 2023, DeepSpeed-Ulysses): trade the sequence shard for a head shard.

An all-to-all turns each of q, k, v from [b, heads, s/p, d] (sequence-sharded) into [b, heads/p, s, d]
(head-sharded); every rank then runs ordinary attention over the full sequence for its heads, and a
fourth all-to-all turns the output back. Per rank each
all-to-all moves (p-1)/p of its input, so a forward moves (p-1)/p·(|q| + |k| + |v| + |out|) — the 4·N·h/p per link of the paper — and backward
the same again. Needs heads (and K/V heads) divisible by p. All calls are recorded under "ulysses_attn".
"""

from __future__ import annotations

import torch

from .attention import check_qkv
from .kind import AttentionKind, LocalShape, heads_problem, no_extra_memory
from ..core.comm import Comm
from ..core.mappings import all_to_all
from ..models.attention import dense_attention

HEADS, SEQ = 1, 2


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, *,
                      causal: bool = False) -> torch.Tensor:
    """This rank's attention output for its contiguous sequence shard ``q, k, v`` ([b, heads, s/p, d])."""
    check_qkv(q, k, v, f"rank {comm.rank} of its group: ulysses_attention")
    if q.shape[HEADS] % comm.world_size or k.shape[HEADS] % comm.world_size:
        raise ValueError(f"rank {comm.rank} of its group: ulysses_attention needs heads divisible by world_size "
                         f"{comm.world_size}; got {q.shape[HEADS]} query heads and {k.shape[HEADS]} key/value heads")
    with comm.scope("ulysses_attn"):
        q, k, v = (all_to_all(x, comm, scatter_dim=HEADS, gather_dim=SEQ) for x in (q, k, v))
        out = dense_attention(q, k, v, causal=causal)
        return all_to_all(out, comm, scatter_dim=SEQ, gather_dim=HEADS)


def ulysses_wire_bytes(shape: LocalShape, u: int) -> int:
    """Bytes one rank sends in one direction (forward, or backward) of Ulysses on u ranks: four
    all-to-alls of (u-1)/u of q, k, v and out (module docstring)."""
    return (u - 1) * (2 * shape.q_elems + 2 * shape.kv_elems) * shape.elem // u


def ulysses_excess(shape: LocalShape, u: int) -> tuple[float, float]:
    """(forward, backward) FLOPs counted beyond a causal flash kernel, on the meta device where the planner
    simulates: the local attention is one diagonal of u·tokens for q_heads/u heads through
    ``scaled_dot_product_attention``, which there runs as plain matmuls: 4·n²·d per head forward (half
    of it masked) and 8·n²·d backward against a causal flash kernel's 5·n²·d: the excess is F and 1.5·F.
    (On the CPU, torch's counter books the fused kernel's backward at 10·n²·d, so the excess would be 2.5·F.)"""
    n = u * shape.tokens
    forward = 2.0 * n * n * shape.head_dim * (shape.q_heads // u) * shape.batch
    return forward, 1.5 * forward


def _attend(q, k, v, *, ulysses, ring, causal, layout):
    return ulysses_attention(q, k, v, ulysses, causal=causal)


KIND = AttentionKind(
    name="ulysses",
    summary="Ulysses (Jacobs et al. 2023): all-to-all from sequence to head shards, local attention, and back",
    groups=("ulysses",),
    attend=_attend,
    wire_bytes=lambda shape, u, r: {("ulysses", "forward"): ulysses_wire_bytes(shape, u),
                                    ("ulysses", "backward"): ulysses_wire_bytes(shape, u)},
    causal_excess=lambda shape, u, r, layout: ulysses_excess(shape, u),
    extra_saved_bytes=no_extra_memory,
    problem=lambda shape, u, r, layout: heads_problem(shape, u),
)
