"""Parameters as exact slices of one dense master, the attributes that say how, and the way back.

Every parameter of a parallel layer is a copy of (a slice of) one dense module and carries
Megatron's attributes: ``partition_dim`` (the dim it is split on, None when every rank holds all of
it), ``partition_stride`` and ``sequence_parallel`` (True when it only sees this rank's tokens, so
its gradient must be summed over the group: ``sync_sequence_parallel_grads``). ``gather_dense_grads``
(dense.py) reads the same attributes to rebuild the dense gradients. Activations are
``[batch, seq, features]``; sequence parallelism (SP) shards ``SEQUENCE_DIM = 1``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..core.comm import Comm

SEQUENCE_DIM = 1


def sliced_parameter(data: torch.Tensor, like: nn.Parameter, partition_dim: int | None = None, stride: int = 1,
                     sequence_parallel: bool = False) -> nn.Parameter:
    """A new parameter holding ``data`` (a slice of ``like``), with Megatron's attributes (module docstring)."""
    p = nn.Parameter(data.detach().clone(), requires_grad=like.requires_grad)
    p.partition_dim, p.partition_stride, p.sequence_parallel = partition_dim, stride, sequence_parallel
    return p


def shard(w: torch.Tensor, comm: Comm, dim: int, stride: int) -> torch.Tensor:
    """This rank's part of ``w``: ``dim`` is cut into stride·t equal pieces, rank r keeps r, r+t, r+2t, ..."""
    t = comm.world_size
    if w.shape[dim] % (stride * t):
        raise ValueError(f"rank {comm.rank}: cannot split size {w.shape[dim]} of dim {dim} (shape {tuple(w.shape)}) "
                         f"into {t} ranks x {stride} equal pieces")
    return torch.cat(w.chunk(stride * t, dim)[comm.rank::t], dim)


def unshard(x: torch.Tensor, dim: int, t: int, stride: int) -> torch.Tensor:
    """Inverse of ``_shard`` on the concatenation of every rank's part (rank-major → dense order)."""
    dim = dim % x.dim()
    return x.unflatten(dim, (t, stride, -1)).transpose(dim, dim + 1).flatten(dim, dim + 2)


def replicate(module: nn.Module, *, sequence_parallel: bool = False) -> nn.Module:
    """A copy of ``module`` that every rank holds whole (e.g. a LayerNorm).

    With ``sequence_parallel`` it runs on sequence shards, so its parameters are marked for
    ``sync_sequence_parallel_grads``.
    """
    module = copy.deepcopy(module)
    for p in module.parameters():
        p.partition_dim, p.partition_stride, p.sequence_parallel = None, 1, sequence_parallel
    return module
