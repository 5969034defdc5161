"""``DistributedDataParallel``: gradients all-reduced in buckets while backward is still running.

``ddp = ts.DistributedDataParallel(module, comm, bucket_cap_mb=25)`` (the names of
``torch.nn.parallel.DistributedDataParallel``):

1. at construction, rank 0's parameters are broadcast to every rank (scope "ddp_init"), so the
   replicas start equal; the parameters are cut into buckets (buckets.py: last parameter first);
2. a hook on every parameter (``register_post_accumulate_grad_hook``) fires once autograd has
   accumulated its gradient; the gradient is copied into its bucket's flat buffer and ``param.grad``
   becomes a view of it (torch's ``gradient_as_bucket_view=True``: no second copy is kept);
3. once every gradient of a bucket has arrived, the bucket is all-reduced with op "avg" — while
   backward goes on computing earlier layers. Buckets are launched in bucket order (a bucket ready
   early waits for those before it, as torch's Reducer does), recorded with phase "grad_sync" and
   scope "dp_grads/bucket<i>";
4. at the end of backward (a callback queued on autograd's engine) every bucket must have been
   reduced: a parameter that got no gradient is an error naming it (torch's unused-parameter error),
   never a silently unreduced gradient.

Bytes per rank and step: one all-reduce of every gradient, 2Ψ(p−1)/p for Ψ gradient bytes.

Gradient accumulation: forwards and backwards inside ``with ddp.no_sync():`` only accumulate
gradients locally (in the bucket views); the first forward and backward outside it reduces the sum.
As in torch, whether a backward reduces is decided by its *forward* (the forward must run inside
``no_sync``). Misuse fails loudly: a second forward before the previous one's gradients were
reduced, or an optimizer step on gradients that were never reduced (every backward since the last
reduction ran under ``no_sync``), raise ``SimulationError`` naming the rank and a parameter: a
``torch.optim`` optimizer's step at once (unreduced.py), an update made by hand at the next forward
(the parameters' version counters). Each rank's loss should be the mean over its own batch (divided by the number of
accumulated micro-batches): the averaged gradient is then the dense model's gradient of the global mean.

ZeRO-1 and ZeRO-2 (zero.py) replace the all-reduce by a reduce-scatter through ``ZeroOptimizer``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from ..core.comm import Comm
from ..core.errors import SimulationError
from .buckets import Bucket, build_buckets
from .group import data_parallel_group
from . import unreduced


class BucketReducer(Protocol):
    """How a bucket's gradients are reduced (ZeroOptimizer implements it; DDP alone all-reduces)."""

    keeps_full_gradients: bool  # the full gradient buffer stays on every rank (DDP, ZeRO-1) or not (ZeRO-2)

    def reduce(self, bucket: Bucket) -> None: ...


class DistributedDataParallel(nn.Module):
    """One rank's replica of ``module``; its gradients are averaged over ``comm`` during backward (module docstring)."""

    def __init__(self, module: nn.Module, comm: Comm, bucket_cap_mb: float = 25) -> None:
        super().__init__()
        self.comm = data_parallel_group(comm, "DistributedDataParallel")
        self.module = module
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"rank {self.comm.rank}: DistributedDataParallel got a module with no parameter that "
                             f"requires a gradient ({type(module).__name__}): there is nothing to synchronise")
        self.bucket_cap_mb = bucket_cap_mb
        self.buckets = build_buckets(named, bucket_cap_mb)
        self.require_backward_grad_sync = True
        self.reducer: BucketReducer | None = None  # set by ZeroOptimizer
        self._sync_pending = False  # a synchronising forward ran; its backward has not finished
        self._this_backward_syncs = False
        self._in_backward = False
        self._next_bucket = 0
        self._unreduced_versions: list[int] | None = None  # parameter versions after a no_sync backward
        self._hooks: list[Any] = []
        self._broadcast_parameters()
        self.rebind_buckets(self.buckets, full_gradient_buffers=True)

    # ---- setup ----------------------------------------------------------------------------------

    def _broadcast_parameters(self) -> None:
        """Make every replica start from rank 0's parameters (torch DDP's ``_sync_module_states``)."""
        with torch.no_grad(), self.comm.scope("ddp_init"):
            for bucket in self.buckets:
                flat = self.comm.broadcast(bucket.flatten([p.detach() for p in bucket.params]), src=0)
                for i, p in enumerate(bucket.params):
                    p.copy_(bucket.view(flat, i))

    def rebind_buckets(self, buckets: list[Bucket], *, full_gradient_buffers: bool) -> None:
        """Hook every parameter of ``buckets`` (replacing older hooks); with ``full_gradient_buffers`` each
        bucket gets a flat gradient buffer its parameters' ``.grad`` become views of (``ZeroOptimizer``
        calls this after making the parameters views of flat parameter buffers)."""
        for h in self._hooks:
            h.remove()
        self.buckets = buckets
        self._where = {id(p): (b, i) for b in buckets for i, p in enumerate(b.params)}
        self._grad_buffers = ([torch.zeros(b.padded, dtype=b.dtype) for b in buckets]
                              if full_gradient_buffers else None)
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for b in buckets for p in b.params]

    @property
    def parameters_in_buckets(self) -> list[nn.Parameter]:
        return [p for b in self.buckets for p in b.params]

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            self._check_no_step_on_unreduced_gradients()
            if self._sync_pending:
                raise SimulationError(
                    f"rank {self.comm.rank}: DistributedDataParallel forward called again before the previous "
                    f"forward's gradients were reduced (expected to have finished reduction in the prior iteration "
                    f"before starting a new one): run its backward first, or run both forwards inside no_sync()")
            self._this_backward_syncs = self.require_backward_grad_sync
            self._sync_pending = self.require_backward_grad_sync
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally: backwards of forwards run inside are not reduced."""
        if self.reducer is not None and not self.reducer.keeps_full_gradients:
            raise ValueError(f"rank {self.comm.rank}: no_sync() cannot be used with ZeRO-2: its gradients are "
                             f"sharded as they are produced (DeepSpeed refuses it too); accumulate with plain "
                             f"backwards, each reduce-scatters into this rank's shard")
        previous, self.require_backward_grad_sync = self.require_backward_grad_sync, False
        try:
            yield
        finally:
            self.require_backward_grad_sync = previous

    def _check_no_step_on_unreduced_gradients(self) -> None:
        if self._unreduced_versions is None:
            return
        changed = [n for b in self.buckets for n, p in zip(b.names, b.params)
                   if p._version != self._unreduced_versions[self._index[id(p)]]]
        if changed:
            raise SimulationError(
                f"rank {self.comm.rank}: parameters changed ({changed[0]}, ... {len(changed)} of them) while their "
                f"gradients were never reduced: every backward since the last reduction ran under no_sync(), so an "
                f"optimizer step used this rank's local gradients; run the last micro-batch outside no_sync()")

    # ---- backward -------------------------------------------------------------------------------

    def _grad_ready(self, p: nn.Parameter) -> None:
        """Autograd accumulated ``p``'s gradient: put it into its bucket; reduce the buckets now complete."""
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
        bucket, i = self._where[id(p)]
        if self._grad_buffers is not None:
            view = bucket.view(self._grad_buffers[bucket.index], i)
            if p.grad.data_ptr() != view.data_ptr():  # a fresh gradient (after zero_grad): the buffer takes it
                view.copy_(p.grad)
                p.grad = view
        if not self._this_backward_syncs:
            return
        bucket.ready.add(id(p))
        while (self._next_bucket < len(self.buckets)
               and len(self.buckets[self._next_bucket].ready) == len(self.buckets[self._next_bucket].params)):
            self._reduce(self.buckets[self._next_bucket])
            self._next_bucket += 1

    def _reduce(self, bucket: Bucket) -> None:
        with self.comm.phase("grad_sync"), self.comm.replay_scope(f"dp_grads/bucket{bucket.index}"):
            if self.reducer is not None:
                self.reducer.reduce(bucket)
            else:
                flat = self._grad_buffers[bucket.index]
                flat.copy_(self.comm.all_reduce(flat, op="avg"))

    def gradient_buffer(self, bucket: Bucket) -> torch.Tensor | None:
        """The flat gradient buffer of ``bucket`` (None under ZeRO-2, which keeps no full gradients)."""
        return None if self._grad_buffers is None else self._grad_buffers[bucket.index]

    def _finish_backward(self) -> None:
        """End of a backward: every bucket reduced (a synchronising one), or the gradients marked unreduced."""
        self._in_backward = False
        if not self._this_backward_syncs:
            self._index = {id(p): k for k, p in enumerate(self.parameters_in_buckets)}
            self._unreduced_versions = [p._version for p in self.parameters_in_buckets]
            unreduced.mark(((n, p) for b in self.buckets for n, p in zip(b.names, b.params)),
                           f"rank {self.comm.rank}: optimizer step on {{name}}, whose gradient was never reduced: every "
                           f"backward since the last reduction ran under no_sync(), so the step would use this rank's "
                           f"local gradients and the replicas would drift apart; run the last micro-batch outside "
                           f"no_sync()")
            return
        unreduced.clear(self.parameters_in_buckets)
        missing = [n for b in self.buckets for n, p in zip(b.names, b.params) if id(p) not in b.ready]
        for b in self.buckets:
            b.ready.clear()
        self._next_bucket, self._sync_pending, self._unreduced_versions = 0, False, None
        if missing:
            raise SimulationError(
                f"rank {self.comm.rank}: DistributedDataParallel backward ended with {len(missing)} parameter(s) "
                f"that got no gradient ({', '.join(missing[:4])}), so their buckets were never reduced: every "
                f"parameter must take part in the loss")

    @property
    def has_unreduced_gradients(self) -> bool:
        """True after a ``no_sync`` backward until a synchronising backward (or a forward still waiting for one)."""
        return self._unreduced_versions is not None or self._sync_pending

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The tensors this wrapper keeps besides the module's own (``ts.held_bytes`` counts them)."""
        return {"gradients": list(self._grad_buffers or [])}
