"""Tensor- and sequence-parallel layers (Megatron-LM: Shoeybi et al. 2019, Korthikanti et al. 2022).

Activations are ``[batch, seq, features]``; sequence parallelism (SP) shards ``SEQUENCE_DIM = 1``.

    ColumnParallelLinear   A split on its outputs:  Y_i = X A_i^T + b_i        f before (SP: g)
    RowParallelLinear      B split on its inputs:   Y = sum_i X_i B_i^T + b     f̄ after  (SP: ḡ)

Every parameter is an exact slice of one dense module (sharding.py). A column layer can also be
built from several dense linears that read one input (fused.py):
``ColumnParallelLinear.from_dense([q, k, v], comm, heads=(8, 2, 2))``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.autograd import CommFunction
from ..core.comm import Comm
from ..core.mappings import copy_to_region, gather_from_region, reduce_from_region, reduce_scatter_to_sequence_region
from .fused import SumOverReplicas, fused_shard, fused_to_dense, plan_pieces, replica_groups
from .sharding import SEQUENCE_DIM, shard, sliced_parameter, unshard


class _GatherLinear(CommFunction):
    """forward: all-gather the sequence shard, then X W^T + b; backward: all-gather X again, reduce-scatter dX.

    Only the shard is saved, so the memory of this input is divided by t (Korthikanti et al. §4.2.2;
    Megatron's LinearWithGradAccumulationAndAsyncCommunication).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, comm):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(comm.all_gather(x, SEQUENCE_DIM), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        total = ctx.comm.all_gather(x, SEQUENCE_DIM)
        grad_x = ctx.comm.reduce_scatter(grad @ weight, SEQUENCE_DIM)
        grad_2d = grad.flatten(0, -2)
        grad_w = grad_2d.T @ total.flatten(0, -2)
        grad_b = grad_2d.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


class ColumnParallelLinear(nn.Module):
    """Y_i = X A_i^T + b_i: this rank's slice of the output features (build with ``from_dense``).

    Input: X whole on every rank (f: identity forward, all-reduce backward), or with
    ``sequence_parallel`` this rank's sequence shard (g: all-gather forward, reduce-scatter backward).
    Output: this rank's output features for the full sequence, or all of them with ``gather_output``.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, comm: Comm, *,
                 sequence_parallel: bool = False, gather_output: bool = False,
                 replica_groups: Sequence[tuple[Comm, list[slice]]] = ()) -> None:
        super().__init__()
        self.weight, self.bias, self.comm = weight, bias, comm
        self.sequence_parallel, self.gather_output = sequence_parallel, gather_output
        self.replica_groups = list(replica_groups)

    @classmethod
    def from_dense(cls, linear: nn.Linear | Sequence[nn.Linear], comm: Comm, *, sequence_parallel: bool = False,
                   gather_output: bool = False, stride: int = 1, heads: Sequence[int] | None = None,
                   names: Sequence[str] | None = None) -> "ColumnParallelLinear":
        """Slice ``linear``'s rows: rank r keeps output pieces r, r+t, ... of stride·t
        (``stride=3`` on a fused [q | k | v] projection gives each rank the q, k and v of its heads).

        A list of linears (or ``heads``) fuses them: rank r keeps its share of each one's ``heads``
        (output features when ``heads`` is None), replicated when t is a multiple of a piece's heads.
        ``names``: the pieces' dense module names beside this layer (gather_dense_grads reports
        ``<parent>.<name>.weight``; default ``<this layer>.<i>.weight``, as an ``nn.ModuleList``).
        """
        if isinstance(linear, nn.Linear) and heads is None and names is None:
            weight = sliced_parameter(shard(linear.weight, comm, 0, stride), linear.weight, 0, stride)
            bias = None if linear.bias is None else sliced_parameter(shard(linear.bias, comm, 0, stride), linear.bias, 0, stride)
            return cls(weight, bias, comm, sequence_parallel=sequence_parallel, gather_output=gather_output)
        linears = [linear] if isinstance(linear, nn.Linear) else list(linear)
        if stride != 1:
            raise ValueError(f"rank {comm.rank}: ColumnParallelLinear.from_dense takes stride or fused linears, not both")
        pieces = plan_pieces(linears, heads, names, comm)
        weight = sliced_parameter(fused_shard([lin.weight for lin in linears], pieces), linears[0].weight, 0)
        bias = None if linears[0].bias is None else sliced_parameter(
            fused_shard([lin.bias for lin in linears], pieces), linears[0].bias, 0)
        for p in (weight, bias):
            if p is not None:
                p.fused_pieces = pieces
        return cls(weight, bias, comm, sequence_parallel=sequence_parallel, gather_output=gather_output,
                   replica_groups=replica_groups(pieces, comm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.replica_groups:
            weight = SumOverReplicas.apply(weight, self.replica_groups, self.comm)
            bias = None if bias is None else SumOverReplicas.apply(bias, self.replica_groups, self.comm)
        if self.sequence_parallel:
            y = _GatherLinear.apply(x, weight, bias, self.comm)
        else:
            y = F.linear(copy_to_region(x, self.comm), weight, bias)
        if self.gather_output:
            y = gather_from_region(y, self.comm, -1)
            pieces = getattr(self.weight, "fused_pieces", None)
            y = (unshard(y, -1, self.comm.world_size, self.weight.partition_stride) if pieces is None
                 else torch.cat([copies[0] for copies in fused_to_dense(y, -1, pieces, self.comm.world_size)], -1))
        return y

    def extra_repr(self) -> str:
        pieces = getattr(self.weight, "fused_pieces", None)
        fused = "" if pieces is None else ", pieces=[" + ", ".join(  # e.g. "k 1/2 x2": 1 of 2 heads, on 2 ranks
            f"{p.name or i} {p.local_rows // p.unit_rows}/{p.units}" + (f" x{p.replicas}" if p.replicas > 1 else "")
            for i, p in enumerate(pieces)) + "]"
        return (f"in_features={self.weight.shape[1]}, out_features_per_rank={self.weight.shape[0]}, "
                f"world_size={self.comm.world_size}, sequence_parallel={self.sequence_parallel}{fused}")


class RowParallelLinear(nn.Module):
    """Y = Σ_i X_i B_i^T + b: this rank holds the input features X_i (a column layer's output).

    The partial products are summed by f̄ (all-reduce), or with ``sequence_parallel`` by ḡ
    (reduce-scatter: each rank keeps its sequence shard of the sum). The bias is added once, after.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, comm: Comm, *,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        self.weight, self.bias, self.comm, self.sequence_parallel = weight, bias, comm, sequence_parallel

    @classmethod
    def from_dense(cls, linear: nn.Linear, comm: Comm, *, sequence_parallel: bool = False) -> "RowParallelLinear":
        """Slice ``linear``'s columns; the bias is copied whole (under SP it sees only this rank's tokens)."""
        weight = sliced_parameter(shard(linear.weight, comm, 1, 1), linear.weight, 1)
        bias = None if linear.bias is None else sliced_parameter(linear.bias, linear.bias, sequence_parallel=sequence_parallel)
        return cls(weight, bias, comm, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_region(y, self.comm, SEQUENCE_DIM)
        else:
            y = reduce_from_region(y, self.comm)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features_per_rank={self.weight.shape[1]}, out_features={self.weight.shape[0]}, "
                f"world_size={self.comm.world_size}, sequence_parallel={self.sequence_parallel}")
