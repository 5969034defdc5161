"""Ulysses attention (Jacobs et al. 2023, DeepSpeed-Ulysses): trade the sequence shard for a head shard.

An all-to-all turns each of q, k, v from [b, heads, s/p, d] (sequence-sharded) into [b, heads/p, s, d]
(head-sharded); every rank then runs ordinary attention over the full sequence for its heads, and a
fourth all-to-all turns the output back. Per rank each all-to-all moves (p-1)/p of its input, so a
forward moves (p-1)/p·(|q| + |k| + |v| + |out|) — the 4·N·h/p per link of the paper — and backward
the same again. Needs heads (and K/V heads) divisible by p. All calls are recorded under "ulysses_attn".
"""

from __future__ import annotations

import torch

from .attention import check_qkv, dense_attention
from ..core.comm import Comm
from ..tensor_parallel.mappings import all_to_all

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
