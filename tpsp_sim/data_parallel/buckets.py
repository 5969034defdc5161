"""Gradient buckets: the parameters of a data-parallel module cut into flat groups reduced by one collective each.

As ``torch.nn.parallel.DistributedDataParallel`` builds them: the parameters in *reverse* order of
``module.parameters()`` (backward produces the last layer's gradients first), a new bucket once the
current one holds ``bucket_cap_mb`` MiB or the dtype changes (a bucket may pass the cap by its last
parameter, as torch's ``_compute_bucket_assignment_by_size`` does). Torch starts with one bucket and
rebuilds them after the first iteration in the order gradients really arrived; here the reverse
definition order is used from the start (the same for a model whose forward runs its layers in order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

MIB = 1024 * 1024


@dataclass(eq=False)
class Bucket:
    """One flat group: ``params`` in bucket order, each at ``offsets[i]`` of a buffer of ``padded`` elements."""

    index: int
    params: list[nn.Parameter]
    names: list[str]
    offsets: list[int]
    numel: int  # elements of the parameters
    padded: int  # numel rounded up to a multiple of the shard count (numel when unsharded)
    dtype: torch.dtype
    ready: set[int] = field(default_factory=set)  # ids of the parameters whose gradient arrived this backward

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Parameter ``i``'s place in a flat buffer of this bucket, shaped like it."""
        p = self.params[i]
        return flat[self.offsets[i]:self.offsets[i] + p.numel()].view_as(p)

    def flatten(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The flat buffer of ``tensors`` (one per parameter), zero-padded to ``padded`` elements."""
        pad = [tensors[0].new_zeros(self.padded - self.numel)] if self.padded > self.numel else []
        return torch.cat([t.reshape(-1) for t in tensors] + pad)

    def shard(self, rank: int, shards: int) -> slice:
        """The elements of the flat buffer that rank ``rank`` of ``shards`` owns (contiguous, equal sizes)."""
        size = self.padded // shards
        return slice(rank * size, (rank + 1) * size)


def build_buckets(named: list[tuple[str, nn.Parameter]], bucket_cap_mb: float, shards: int = 1) -> list[Bucket]:
    """Cut ``named`` (in ``module.named_parameters()`` order) into buckets of about ``bucket_cap_mb`` MiB,
    last parameter first; each bucket padded to a multiple of ``shards`` elements."""
    if not (isinstance(bucket_cap_mb, (int, float)) and not isinstance(bucket_cap_mb, bool) and bucket_cap_mb > 0):
        raise ValueError(f"bucket_cap_mb must be a positive number of MiB, got {bucket_cap_mb!r}")
    cap = bucket_cap_mb * MIB
    groups: list[list[tuple[str, nn.Parameter]]] = []
    size = 0.0
    for name, p in reversed(named):
        if not groups or size >= cap or groups[-1][0][1].dtype != p.dtype:
            groups.append([])
            size = 0.0
        groups[-1].append((name, p))
        size += p.numel() * p.element_size()
    buckets = []
    for i, group in enumerate(groups):
        offsets = [0]
        for _, p in group[:-1]:
            offsets.append(offsets[-1] + p.numel())
        numel = offsets[-1] + group[-1][1].numel()
        buckets.append(Bucket(i, [p for _, p in group], [n for n, _ in group], offsets, numel,
                              math.ceil(numel / shards) * shards, group[0][1].dtype))
    return buckets
