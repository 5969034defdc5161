"""Fused column layers: several dense linears that read one input (q, k, v; gate, up) in one layer.

``ColumnParallelLinear.from_dense([q, k, v], comm, heads=(8, 2, 2))``: each rank's weight is
[q_r; k_r; v_r], the rows of its heads, so the sublayer costs one collective (Megatron's fused
linear_qkv). With fewer K/V heads than ranks each K/V head is replicated on t / n_kv ranks (as
vLLM's QKVParallelLinear does); every replica sees only its ranks' query heads, so the backward
all-reduces the replicated rows' weight gradient over the ranks sharing the head (2(g-1)/g · 2·d_head·h
elements per rank for g = t / n_kv replicas), after which every replica holds the dense gradient.
The fused weight carries ``fused_pieces`` (a ``Piece`` per dense linear), which ``gather_dense_grads``
reads to return each piece under its dense name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..core.autograd import CommFunction
from ..core.comm import Comm


@dataclass(frozen=True)
class Piece:
    """One dense linear of a fused column layer, as this rank holds it."""

    name: str | None  # dense module name beside the fused layer (None: "<fused layer>.<index>")
    units: int        # heads, or output features when the piece has no heads
    unit_rows: int    # dense rows per unit (head_dim, or 1)
    replicas: int     # ranks holding each unit (t / units when units < t, else 1)
    start: int        # this rank's first dense row
    local_rows: int


def plan_pieces(linears: Sequence[nn.Linear], heads: Sequence[int] | None, names: Sequence[str] | None,
                 comm: Comm) -> list[Piece]:
    """Which rows of each dense linear this rank keeps: units (heads) split over t, or replicated when t > units."""
    t, r = comm.world_size, comm.rank
    labels = list(names) if names is not None else [str(i) for i in range(len(linears))]
    where = f"rank {r}: ColumnParallelLinear.from_dense([{', '.join(labels)}])"
    if heads is not None and len(heads) != len(linears) or names is not None and len(names) != len(linears):
        raise ValueError(f"{where}: got {len(linears)} linears, heads={heads}, names={names}")
    if len({lin.in_features for lin in linears}) != 1 or len({lin.bias is None for lin in linears}) != 1:
        raise ValueError(f"{where}: fused linears must share in_features and all have (or all lack) a bias; got "
                         f"in_features {[lin.in_features for lin in linears]}, "
                         f"bias {[lin.bias is not None for lin in linears]}")
    pieces = []
    for i, (label, lin) in enumerate(zip(labels, linears)):
        rows, name = lin.out_features, None if names is None else names[i]
        units = rows if heads is None else heads[i]
        if units < 1 or rows % units:
            raise ValueError(f"{where}: {label} has {rows} output features, not divisible into {units} heads")
        unit_rows = rows // units
        if units % t == 0:
            per_rank = units // t
            pieces.append(Piece(name, units, unit_rows, 1, r * per_rank * unit_rows, per_rank * unit_rows))
        elif heads is not None and t % units == 0:
            replicas = t // units
            pieces.append(Piece(name, units, unit_rows, replicas, r // replicas * unit_rows, unit_rows))
        else:
            what = f"{units} heads" if heads is not None else f"{rows} output features"
            raise ValueError(f"{where}: {label} has {what}, which cannot be split over t={t} ranks "
                             f"({'t must divide the heads or be a multiple of them' if heads is not None else 'not divisible'})")
    return pieces


def fused_shard(tensors: Sequence[torch.Tensor], pieces: Sequence[Piece]) -> torch.Tensor:
    return torch.cat([x[p.start:p.start + p.local_rows] for x, p in zip(tensors, pieces)], 0)


def fused_to_dense(x: torch.Tensor, dim: int, pieces: Sequence[Piece], t: int) -> list[list[torch.Tensor]]:
    """Every rank's fused block concatenated on ``dim`` → per piece, the list of its copies of the dense
    tensor (one per replica: all equal for values and summed gradients)."""
    blocks = [b.split([p.local_rows for p in pieces], dim) for b in x.chunk(t, dim)]
    return [[torch.cat([blocks[r][i] for r in range(copy_, t, p.replicas)], dim) for copy_ in range(p.replicas)]
            for i, p in enumerate(pieces)]


def replica_groups(pieces: Sequence[Piece], comm: Comm) -> list[tuple[Comm, list[slice]]]:
    """(the group of ranks sharing my heads, my rows of those heads) per replication factor; collective."""
    groups, offsets = [], [0]
    for p in pieces:
        offsets.append(offsets[-1] + p.local_rows)
    for replicas in sorted({p.replicas for p in pieces} - {1}):
        mine = None
        for first in range(0, comm.world_size, replicas):  # every rank creates every group, in one order
            group = comm.new_group(range(first, first + replicas))
            mine = group if group is not None else mine
        rows = [slice(offsets[i], offsets[i + 1]) for i, p in enumerate(pieces) if p.replicas == replicas]
        groups.append((mine, rows))
    return groups


class SumOverReplicas(CommFunction):
    """forward: identity on a fused weight, backward: all-reduce the rows of replicated heads over their replicas."""

    @staticmethod
    def forward(ctx, w, groups, comm):  # comm: the layer's, whose recorder the replica groups share
        ctx.groups = groups
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        for group, rows in ctx.groups:
            summed = group.all_reduce(torch.cat([grad[r] for r in rows]))
            for r, part in zip(rows, summed.split([r.stop - r.start for r in rows])):
                grad[r] = part
        return grad, None, None
