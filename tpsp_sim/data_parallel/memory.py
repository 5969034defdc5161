"""What each rank really holds: bytes of weights, gradients and optimizer state, from the tensors themselves.

``ts.held_bytes(module, optimizer)`` adds up distinct storages (a view counts with its whole storage,
once; a storage FSDP has freed counts 0): the module's parameters and their ``.grad``, the optimizer's
parameters, their ``.grad`` and its state, and what the wrappers keep besides (``held_tensors()`` of
``DistributedDataParallel``, ``ZeroOptimizer`` and every ``FSDPModule``: gradient buckets, gradient
shards, unsharded parameters). Compare with ``zero_memory_per_rank`` (closed_forms.py).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

KINDS = ("weights", "gradients", "optimizer")


def _wrapped(module: nn.Module, optimizer: Any) -> list[dict[str, list[torch.Tensor]]]:
    found = [m.held_tensors() for m in module.modules() if hasattr(m, "held_tensors")]
    if hasattr(optimizer, "held_tensors"):
        found.append(optimizer.held_tensors())
    return found


def held_bytes(module: nn.Module, optimizer: Any = None) -> dict[str, int]:
    """{"weights", "gradients", "optimizer"}: bytes of distinct storages this rank holds for each (module docstring)."""
    tensors: dict[str, list[torch.Tensor]] = {k: [] for k in KINDS}
    params = list(module.parameters())
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeroOptimizer wraps a torch optimizer
    if isinstance(inner, torch.optim.Optimizer):
        params += [p for g in inner.param_groups for p in g["params"]]
        tensors["optimizer"] += [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t)]
    tensors["weights"] += params
    tensors["gradients"] += [p.grad for p in params if p.grad is not None]
    for extra in _wrapped(module, optimizer):
        for kind, ts_ in extra.items():
            tensors[kind] += ts_
    return {kind: _storage_bytes(tensors[kind]) for kind in KINDS}


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes():
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
