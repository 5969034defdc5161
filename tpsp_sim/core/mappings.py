"""Differentiable collectives: one autograd Function per change of region (Megatron-LM's mappings).

Korthikanti et al. 2022 name four of them (TP regions are sharded on the hidden dim, SP regions
on the sequence dim):

    f      copy_to_region                    forward: identity       backward: all-reduce
    f̄      reduce_from_region                forward: all-reduce     backward: identity
    g      gather_from_sequence_region       forward: all-gather     backward: reduce-scatter
    ḡ      reduce_scatter_to_sequence_region forward: reduce-scatter backward: all-gather

plus ``split_to_region`` / ``gather_from_region`` (keep this rank's chunk of a dim, or
concatenate every rank's) and ``all_to_all`` (Ulysses). Each is a ``CommFunction``, so its backward
collective is recorded with phase "backward" under the scope the forward ran in.
"""

from __future__ import annotations

import torch

from .autograd import CommFunction
from .comm import Comm, normalized_dim


def _dim(x: torch.Tensor, dim: int, comm: Comm, mapping: str, name: str = "dim") -> int:
    return normalized_dim(x, dim, f"rank {comm.rank}: {mapping}", name)


def _shard(x: torch.Tensor, comm: Comm, dim: int) -> torch.Tensor:
    if x.shape[dim] % comm.world_size:
        raise ValueError(f"rank {comm.rank}: cannot split size {x.shape[dim]} of dim {dim} (shape {tuple(x.shape)}) "
                         f"into {comm.world_size} equal chunks")
    return x.chunk(comm.world_size, dim)[comm.rank].contiguous()


class _CopyToRegion(CommFunction):
    """forward: identity, backward: all-reduce."""

    @staticmethod
    def forward(ctx, x, comm):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_reduce(grad), None


class _ReduceFromRegion(CommFunction):
    """forward: all-reduce, backward: identity."""

    @staticmethod
    def forward(ctx, x, comm):
        return comm.all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromSequenceRegion(CommFunction):
    """forward: all-gather along dim, backward: reduce-scatter along dim."""

    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.dim = dim
        return comm.all_gather(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.reduce_scatter(grad, ctx.dim), None, None


class _ReduceScatterToSequenceRegion(CommFunction):
    """forward: reduce-scatter along dim, backward: all-gather along dim."""

    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.dim = dim
        return comm.reduce_scatter(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_gather(grad, ctx.dim), None, None


class _SplitToRegion(CommFunction):
    """forward: keep this rank's chunk of dim, backward: all-gather along dim."""

    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.dim = dim
        return _shard(x, comm, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_gather(grad, ctx.dim), None, None


class _GatherFromRegion(CommFunction):
    """forward: all-gather along dim, backward: keep this rank's chunk of dim."""

    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.dim = dim
        return comm.all_gather(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return _shard(grad, ctx.comm, ctx.dim), None, None


class _AllToAll(CommFunction):
    """forward: all-to-all (scatter_dim → gather_dim), backward: all-to-all (gather_dim → scatter_dim)."""

    @staticmethod
    def forward(ctx, x, comm, scatter_dim, gather_dim):
        ctx.dims = (scatter_dim, gather_dim)
        return comm.all_to_all(x, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return ctx.comm.all_to_all(grad, gather_dim, scatter_dim), None, None, None


def copy_to_region(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """f: enter a tensor-parallel region (identity; gradients are all-reduced)."""
    return _CopyToRegion.apply(x, comm)


def reduce_from_region(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """f̄: leave a tensor-parallel region by summing the partial results of every rank."""
    return _ReduceFromRegion.apply(x, comm)


def gather_from_sequence_region(x: torch.Tensor, comm: Comm, dim: int = 1) -> torch.Tensor:
    """g: sequence shards → the full sequence on every rank (gradients are reduce-scattered)."""
    return _GatherFromSequenceRegion.apply(x, comm, _dim(x, dim, comm, "gather_from_sequence_region"))


def reduce_scatter_to_sequence_region(x: torch.Tensor, comm: Comm, dim: int = 1) -> torch.Tensor:
    """ḡ: partial sums of the full sequence → this rank's summed sequence shard."""
    return _ReduceScatterToSequenceRegion.apply(x, comm, _dim(x, dim, comm, "reduce_scatter_to_sequence_region"))


def split_to_region(x: torch.Tensor, comm: Comm, dim: int = -1) -> torch.Tensor:
    """Keep this rank's chunk of ``dim`` (gradients are all-gathered)."""
    return _SplitToRegion.apply(x, comm, _dim(x, dim, comm, "split_to_region"))


def gather_from_region(x: torch.Tensor, comm: Comm, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (gradients are split back)."""
    return _GatherFromRegion.apply(x, comm, _dim(x, dim, comm, "gather_from_region"))


def all_to_all(x: torch.Tensor, comm: Comm, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Differentiable all-to-all: scatter ``scatter_dim`` across ranks, gather ``gather_dim``."""
    return _AllToAll.apply(x, comm, _dim(x, scatter_dim, comm, "all_to_all", "scatter_dim"),
                           _dim(x, gather_dim, comm, "all_to_all", "gather_dim"))


# Korthikanti et al.'s names for the four conjugate pairs.
f = copy_to_region
f_bar = reduce_from_region
g = gather_from_sequence_region
g_bar = reduce_scatter_to_sequence_region
