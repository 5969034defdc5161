"""Gradient reductions after backward, recorded with phase "grad_sync"."""

from __future__ import annotations

import torch
from torch import nn

from ..core.comm import Comm


def sync_sequence_parallel_grads(module: nn.Module, comm: Comm) -> None:
    """Sum the gradients of ``sequence_parallel`` parameters over the group: call after backward, before the step.

    Under SP the LayerNorms and the row layers' bias see only this rank's tokens, so each rank holds
    part of their gradient (Megatron: ``finalize_model_grads``). An explicit call, not a hook, so
    gradient accumulation over micro-batches stays correct. One all-reduce of the flattened gradients,
    recorded with phase "grad_sync".
    """
    grads = [p.grad for p in module.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if grads:
        all_reduce_bucket(grads, comm, "sp_grads")


def all_reduce_bucket(grads: list[torch.Tensor], comm: Comm, scope: str, op: str = "sum") -> None:
    """All-reduce ``grads`` in place as one bucket: flattened, concatenated, one all-reduce with ``op``,
    recorded with phase "grad_sync" under ``scope``."""
    with comm.phase("grad_sync"), comm.scope(scope):
        total = comm.all_reduce(torch.cat([g.flatten() for g in grads]), op=op)
    for g, reduced in zip(grads, total.split([g.numel() for g in grads])):
        g.copy_(reduced.view_as(g))
