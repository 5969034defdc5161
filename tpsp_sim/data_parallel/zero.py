"""ZeRO-1 and ZeRO-2 on top of ``DistributedDataParallel``: the optimizer state, then the gradients, sharded.

``opt = ts.ZeroOptimizer(ddp, torch.optim.AdamW, stage=1, lr=...)`` (Rajbhandari et al. 2020, §5.1;
Megatron-LM's distributed optimizer). At construction each bucket's parameters become views of one
flat parameter buffer per bucket, padded with zeros to a multiple of p elements (Megatron's param
buffer), so rank r owns the contiguous slice r of every bucket; the wrapped optimizer is built over
those slices only, so it keeps state (AdamW: two moments) for Ψ/p elements. Take the parameters from
the module *after* building it (they are new ``nn.Parameter`` objects with the same values).

Per step:

1. backward: each bucket, once complete, is reduce-scattered (op "avg", phase "grad_sync") instead of
   all-reduced — rank r receives the reduced slice r, Ψ(p−1)/p bytes sent per rank in all;
   * stage 1 keeps every full gradient (the bucket buffers of DDP, Ψ per rank) and writes the reduced
     slice into it; ``no_sync`` accumulates there;
   * stage 2 keeps only the reduced slice (Ψ/p per rank): each backward reduce-scatters and adds into
     it, then frees the parameters' gradients, so ``no_sync`` is refused (it would need the full ones);
   afterwards ``param.grad`` is None on every rank: the reduced gradient exists only as shards;
2. ``step()``: the wrapped optimizer updates slice r of every bucket, then each bucket's slice is
   all-gathered back into the flat parameter buffer (phase "grad_sync", scope "zero/params/bucket<i>"),
   Ψ(p−1)/p bytes. Total 2Ψ(p−1)/p per rank and step, the bytes of plain DDP's all-reduce (§7).

``step()`` raises ``SimulationError`` when a bucket's gradients were not reduced since the last step
(every backward ran under ``no_sync``, or none ran): the final reduction cannot be forgotten silently.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.errors import SimulationError
from .buckets import Bucket
from .ddp import DistributedDataParallel


def _owners(module: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, attribute name) that holds each parameter (a tied parameter has several)."""
    found: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                found.setdefault(id(p), []).append((m, name))
    return found


class ZeroOptimizer:
    """ZeRO stage 1 or 2 over the ranks of ``ddp.comm`` around ``optimizer_class`` (module docstring)."""

    def __init__(self, ddp: DistributedDataParallel, optimizer_class: type[torch.optim.Optimizer], *,
                 stage: int = 1, **defaults: Any) -> None:
        if not isinstance(ddp, DistributedDataParallel):
            raise ValueError(f"ZeroOptimizer wraps a ts.DistributedDataParallel, got {type(ddp).__name__}")
        if stage not in (1, 2):
            raise ValueError(f"rank {ddp.comm.rank}: ZeroOptimizer stage must be 1 or 2 (stage 3 is ts.fully_shard), "
                             f"got {stage!r}")
        if ddp.reducer is not None:
            raise ValueError(f"rank {ddp.comm.rank}: this DistributedDataParallel already has a ZeroOptimizer")
        self.ddp, self.comm, self.stage = ddp, ddp.comm, stage
        self.keeps_full_gradients = stage == 1
        self.buckets, self.param_buffers = self._flatten_parameters()
        mine = [buf[b.shard(self.comm.rank, self.comm.world_size)] for b, buf in zip(self.buckets, self.param_buffers)]
        self.shards = mine  # this rank's slice of each bucket's parameters: what the optimizer steps
        self.grad_shards: list[torch.Tensor | None] = [None] * len(self.buckets)
        self.optimizer = optimizer_class(mine, **defaults)
        ddp.rebind_buckets(self.buckets, full_gradient_buffers=self.keeps_full_gradients)
        ddp.reducer = self

    def _flatten_parameters(self) -> tuple[list[Bucket], list[torch.Tensor]]:
        """Each bucket's parameters as views of one flat buffer padded to a multiple of p (new Parameters)."""
        p = self.comm.world_size
        owners = _owners(self.ddp.module)
        buckets, buffers = [], []
        for old in self.ddp.buckets:
            padded = -(-old.numel // p) * p
            flat = torch.zeros(padded, dtype=old.dtype)
            bucket = Bucket(old.index, [], list(old.names), list(old.offsets), old.numel, padded, old.dtype)
            for i, param in enumerate(old.params):
                view = flat[old.offsets[i]:old.offsets[i] + param.numel()].view_as(param)
                with torch.no_grad():
                    view.copy_(param)
                new = nn.Parameter(view, requires_grad=param.requires_grad)
                new.__dict__.update(param.__dict__)  # partition_dim, sequence_parallel, ...
                for module, name in owners[id(param)]:
                    module._parameters[name] = new
                bucket.params.append(new)
            buckets.append(bucket)
            buffers.append(flat)
        return buckets, buffers

    # ---- called by DDP when a bucket is complete --------------------------------------------------

    def reduce(self, bucket: Bucket) -> None:
        """Reduce-scatter ``bucket``'s gradients: this rank keeps (stage 2: adds up) the reduced slice."""
        full = self.ddp.gradient_buffer(bucket)
        if full is None:
            full = bucket.flatten([p.grad for p in bucket.params])
        mine = self.comm.reduce_scatter(full, dim=0, op="avg")
        k = bucket.index
        if self.keeps_full_gradients:
            own = full[bucket.shard(self.comm.rank, self.comm.world_size)]
            own.copy_(mine)
            self.grad_shards[k] = own
        else:
            self.grad_shards[k] = mine if self.grad_shards[k] is None else self.grad_shards[k].add_(mine)
        for p in bucket.params:
            p.grad = None

    # ---- the optimizer interface ------------------------------------------------------------------

    def step(self) -> None:
        """Step this rank's slices, then all-gather every bucket's parameters."""
        if self.ddp.has_unreduced_gradients or any(g is None for g in self.grad_shards):
            raise SimulationError(
                f"rank {self.comm.rank}: ZeroOptimizer.step (ZeRO-{self.stage}) before the gradients were reduced: "
                f"the last backward ran under no_sync() (or no backward ran since the last step); run the last "
                f"micro-batch's forward and backward outside no_sync()")
        for shard, grad in zip(self.shards, self.grad_shards):
            shard.grad = grad
        self.optimizer.step()
        with torch.no_grad(), self.comm.phase("grad_sync"):
            for bucket, flat, shard in zip(self.buckets, self.param_buffers, self.shards):
                with self.comm.replay_scope(f"zero/params/bucket{bucket.index}"):
                    flat.copy_(self.comm.all_gather(shard, dim=0))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the reduced gradient shards (the parameters' own gradients are None already)."""
        for shard in self.shards:
            shard.grad = None
        self.grad_shards = [None] * len(self.buckets)
        for p in self.ddp.parameters_in_buckets:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Tensors this optimizer keeps besides its state (``ts.held_bytes`` counts them): the gradient shards."""
        return {"gradients": [g for g in self.grad_shards if g is not None]}
