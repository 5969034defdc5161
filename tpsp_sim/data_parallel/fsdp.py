"""``fully_shard``: ZeRO-3 as PyTorch's FSDP2 runs it, one communication group per sharded module.

``ts.fully_shard(block, mesh_or_comm, reshard_after_forward=True)`` (the names of
``torch.distributed.fsdp.fully_shard``), applied bottom-up — every block, then the root model:

* **sharding**: every parameter the module holds (not those of submodules already sharded) is cut
  along dim 0 into p chunks of ceil(d0/p) rows, as ``torch.chunk`` cuts: rank r keeps rows
  [r·c, min((r+1)·c, d0)) — the last ranks may hold fewer rows, or none. Like FSDP2, each shard is
  stored padded to c rows with zeros (the padding is what the all-gather sends), and the module's
  parameter is the unpadded view of it; so with p ∤ d0 a rank holds and sends ceil(d0/p)·rest
  elements, not d0·rest/p. The module's class becomes ``FSDP<Class>`` (a subclass of ``FSDPModule``).
* **forward**: a pre-forward hook all-gathers the module's shards (one flat all-gather for all of
  them, scope "fsdp/<name>") into the unsharded parameters and swaps them in; after forward they are
  freed (their storage resized to 0, as FSDP2 does) unless ``reshard_after_forward=False`` (ZeRO-2-like:
  kept until backward) or the module is the root (FSDP2 never reshards the root after forward: it would
  be all-gathered again at once).
* **backward**: an identity ``_PreBackward`` on the module's outputs all-gathers the parameters again
  before the module's backward runs (into the same storage, so the tensors autograd saved see them);
  once autograd has accumulated every unsharded gradient (``register_post_accumulate_grad_hook``), one
  flat reduce-scatter (op "avg", phase "grad_sync") leaves this rank's rows of the averaged gradient in
  ``param.grad`` of the sharded parameter (added to it when one is there), and the parameters are freed.
  The root's end-of-backward callback reduces any module some of whose parameters got no gradient.
* **optimizer**: any ``torch.optim`` optimizer over ``module.parameters()`` (the shards) steps each
  rank's rows only: its state is Ψ/p too.

Bytes per rank and step for a block sharded with ``reshard_after_forward=True``: all-gather in forward
and in backward, Ψ(p−1)/p each, and the reduce-scatter, Ψ(p−1)/p: 3Ψ(p−1)/p (ZeRO paper §7), with Ψ the
padded parameter bytes p·c·rest·(element size); 2Ψ(p−1)/p for the root and for ``reshard_after_forward=
False``. ``set_requires_gradient_sync(False)`` (gradient accumulation) keeps the unsharded gradients and
skips the reduce-scatter until a backward with it True. Forgetting that final backward is an error
naming the rank and parameter (FSDP2 lets the optimizer skip the parameters, whose sharded gradients
are None: a wrong model): a ``torch.optim`` optimizer's step raises at once (unreduced.py), an update by
hand at the next forward (the sharded parameters' version counters).
Prefetching the next module's all-gather is not run (the simulator's collectives are synchronous) but
priced from a recorded step by ``ts.fsdp_prefetch_overlap`` (overlap.py). Not modelled: mixed
precision, HSDP (a 2-D mesh: pass the flattened group, e.g. ``mesh["dp", "cp"]``, as torchtitan's FSDP
over dp × cp does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..core.autograd import CommFunction
from ..core.comm import Comm
from ..core.errors import SimulationError
from .group import data_parallel_group
from . import unreduced


@dataclass(eq=False)
class _ShardedParam:
    """One parameter under FSDP: its padded shard, the sharded ``nn.Parameter`` (a view) and the unsharded one."""

    owners: list[tuple[nn.Module, str]]
    name: str  # its name in the module given to fully_shard
    shape: torch.Size
    rows: int  # c = ceil(d0 / p): rows of every padded shard
    local_rows: int  # rows this rank really holds (c, fewer, or 0 at the end)
    padded: torch.Tensor  # [c, *shape[1:]]
    sharded: nn.Parameter
    unsharded: nn.Parameter

    @property
    def shard_numel(self) -> int:
        return self.padded.numel()

    def swap_in(self, param: nn.Parameter) -> None:
        for module, name in self.owners:
            module._parameters[name] = param


def _free(t: torch.Tensor) -> None:
    t.untyped_storage().resize_(0)


class FSDPState:
    """The shards of one ``fully_shard`` call on one rank, and what happens to them around forward and backward."""

    def __init__(self, module: nn.Module, comm: Comm, reshard_after_forward: bool) -> None:
        self.comm, self.reshard_after_forward = comm, reshard_after_forward
        self.params = _shard_parameters(module, comm)
        self.offsets = [0]
        for sp in self.params[:-1]:
            self.offsets.append(self.offsets[-1] + sp.shard_numel)
        self.needs_grad = sum(sp.unsharded.requires_grad for sp in self.params)
        self.is_root: bool | None = None  # decided at the first forward (lazy, as FSDP2 does)
        self.label = type(module).__name__
        self.descendants: list[FSDPState] = []
        self.requires_gradient_sync = True
        self.unsharded = False
        self.backward_pending = False
        self.final_callback_queued = False
        self.ready: set[int] = set()
        self.unreduced_versions: list[int] | None = None  # the shards' versions after a backward without sync
        for sp in self.params:
            if sp.unsharded.requires_grad:  # a frozen parameter gets no gradient to wait for
                sp.unsharded.register_post_accumulate_grad_hook(self._grad_ready)

    @property
    def scope(self) -> str:
        return f"fsdp/{self.label}"

    def lazy_init(self, module: nn.Module) -> None:
        if self.is_root is not None:
            return
        self.is_root, self.label = True, "root"
        for name, m in module.named_modules():
            if m is not module and isinstance(m, FSDPModule):
                m._fsdp_state.is_root, m._fsdp_state.label = False, name
                self.descendants.append(m._fsdp_state)

    # ---- all-gather and free ------------------------------------------------------------------------

    def unshard(self) -> None:
        """All-gather every shard (one flat call) into the unsharded parameters and swap them in."""
        if self.unsharded or not self.params:
            return
        p = self.comm.world_size
        with self.comm.replay_scope(self.scope):
            gathered = self.comm.all_gather(torch.cat([sp.padded.reshape(-1) for sp in self.params]), dim=0)
        per_rank = gathered.view(p, -1)
        for sp, off in zip(self.params, self.offsets):
            full = per_rank[:, off:off + sp.shard_numel].reshape(p * sp.rows, *sp.shape[1:])[:sp.shape[0]]
            sp.unsharded.untyped_storage().resize_(sp.unsharded.numel() * sp.unsharded.element_size())
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(sp.unsharded):
                sp.unsharded.copy_(full)  # saved-for-backward references see the refilled storage
            sp.swap_in(sp.unsharded)
        self.unsharded = True

    def reshard(self) -> None:
        """Free the unsharded parameters (storage resized to 0) and swap the shards back in."""
        for sp in self.params:
            _free(sp.unsharded)
            sp.swap_in(sp.sharded)
        self.unsharded = False

    # ---- hooks ----------------------------------------------------------------------------------------

    def pre_forward(self, module: nn.Module, args: Any) -> None:
        self.lazy_init(module)
        if self.unreduced_versions is not None and torch.is_grad_enabled():
            changed = [sp.name for sp, v in zip(self.params, self.unreduced_versions) if sp.sharded._version != v]
            if changed:
                raise SimulationError(
                    f"rank {self.comm.rank}: parameter {self._qualified(changed[0])} changed while its gradient was "
                    f"never reduced (the last backward ran with set_requires_gradient_sync(False)); call "
                    f"set_requires_gradient_sync(True) before the last micro-batch's backward")
        self.unshard()

    def _qualified(self, name: str) -> str:
        return name if self.is_root else f"{self.label}.{name}"

    def post_forward(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.reshard_after_forward and not self.is_root:
            self.reshard()
        leaves, spec = tree_flatten(output)
        slots = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not slots:
            return output
        self.backward_pending = True
        wrapped = _PreBackward.apply(self.comm, self, *(leaves[i] for i in slots))
        for i, t in zip(slots, wrapped):
            leaves[i] = t
        return tree_unflatten(leaves, spec)

    def pre_backward(self) -> None:
        if self.is_root and not self.final_callback_queued:
            self.final_callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        self.unshard()

    def _grad_ready(self, param: nn.Parameter) -> None:
        self.ready.add(id(param))
        if len(self.ready) == self.needs_grad:
            self.post_backward()

    def post_backward(self) -> None:
        """Reduce-scatter the unsharded gradients (one flat call) into the shards' ``.grad``; free the parameters."""
        self.ready.clear()
        self.backward_pending = False
        if self.requires_gradient_sync and self.params:
            p = self.comm.world_size
            rows = []
            for sp in self.params:
                g = sp.unsharded.grad
                padded = sp.padded.new_zeros(p * sp.rows, *sp.shape[1:])
                if g is not None:
                    padded[:sp.shape[0]] = g
                rows.append(padded.view(p, -1))
            with self.comm.phase("grad_sync"), self.comm.replay_scope(self.scope):
                mine = self.comm.reduce_scatter(torch.cat(rows, dim=1).reshape(-1), dim=0, op="avg")
            for sp, off in zip(self.params, self.offsets):
                if sp.unsharded.grad is None:  # frozen, or unused on every rank: no gradient to keep
                    continue
                grad = mine[off:off + sp.shard_numel].view_as(sp.padded)[:sp.local_rows]
                if sp.sharded.grad is None:
                    sp.sharded.grad = grad
                else:
                    sp.sharded.grad.add_(grad)
                sp.unsharded.grad = None
            unreduced.clear(sp.sharded for sp in self.params)
            self.unreduced_versions = None
        elif self.params:
            held = [sp for sp in self.params if sp.unsharded.grad is not None]
            unreduced.mark(((self._qualified(sp.name), sp.sharded) for sp in held),
                           f"rank {self.comm.rank}: optimizer step on {{name}}, whose gradient was never reduced: the "
                           f"last backward ran with set_requires_gradient_sync(False), so the sharded .grad does not "
                           f"hold it; call set_requires_gradient_sync(True) before the last micro-batch's backward")
            self.unreduced_versions = [sp.sharded._version for sp in self.params]
        self.reshard()

    def _end_of_backward(self) -> None:
        """The root's final callback: modules some of whose parameters got no gradient are reduced too."""
        self.final_callback_queued = False
        for state in [*self.descendants, self]:
            if state.backward_pending:
                state.post_backward()

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        return {"weights": [sp.padded for sp in self.params] + [sp.unsharded for sp in self.params],
                "gradients": [sp.unsharded.grad for sp in self.params if sp.unsharded.grad is not None]}


class _PreBackward(CommFunction):
    """forward: identity on a sharded module's outputs; backward: all-gather its parameters again (FSDP2's pre-backward)."""

    @staticmethod
    def forward(ctx, comm, state, *outputs):
        ctx.state = state
        return tuple(t.view_as(t) for t in outputs)

    @staticmethod
    def backward(ctx, *grads):
        # 1. the module's backward is about to run: its parameters must be whole again
        ctx.state.pre_backward()
        # 2. the gradients pass through unchanged
        return (None, None, *grads)


def _shard_parameters(module: nn.Module, comm: Comm) -> list[_ShardedParam]:
    """Replace the parameters ``module`` manages (not those of sharded submodules) by this rank's shards."""
    p, r = comm.world_size, comm.rank
    skip = [name + "." for name, m in module.named_modules() if m is not module and isinstance(m, FSDPModule)]
    owners: dict[int, tuple[nn.Parameter, list[tuple[nn.Module, str]], str]] = {}
    for name, m in module.named_modules():
        if any((name + ".").startswith(s) for s in skip):
            continue
        for pname, param in m._parameters.items():
            if param is not None:
                owners.setdefault(id(param), (param, [], f"{name}.{pname}" if name else pname))[1].append((m, pname))
    dtypes = {param.dtype for param, *_ in owners.values()}
    if len(dtypes) > 1:
        raise ValueError(f"rank {r}: fully_shard flattens one dtype per module, got {sorted(map(str, dtypes))} in "
                         f"{type(module).__name__}")
    sharded = []
    for param, where, qualified in owners.values():
        if param.dim() == 0:
            raise ValueError(f"rank {r}: fully_shard shards along dim 0; {where[0][1]} of {type(module).__name__} is 0-d")
        d0, rest = param.shape[0], param.shape[1:]
        rows = -(-d0 // p)
        local = max(0, min(rows, d0 - r * rows))
        padded = param.new_zeros(rows, *rest)
        padded[:local] = param.detach()[r * rows:r * rows + local]
        shard = nn.Parameter(padded[:local], requires_grad=param.requires_grad)
        whole = nn.Parameter(torch.empty_like(param), requires_grad=param.requires_grad)
        for new in (shard, whole):
            new.__dict__.update(param.__dict__)  # partition_dim, sequence_parallel, ... travel with it
        _free(whole)
        sp = _ShardedParam(where, qualified, param.shape, rows, local, padded, shard, whole)
        sp.swap_in(shard)
        sharded.append(sp)
    return sharded


class FSDPModule:
    """What ``fully_shard`` mixes into a module's class (FSDP2's ``FSDPModule``)."""

    _fsdp_state: FSDPState

    def unshard(self) -> None:
        """All-gather this module's parameters now (e.g. to read the whole weights)."""
        self._fsdp_state.unshard()

    def reshard(self) -> None:
        """Free this module's unsharded parameters."""
        self._fsdp_state.reshard()

    def set_requires_gradient_sync(self, requires_gradient_sync: bool, *, recurse: bool = True) -> None:
        """False: backward keeps the unsharded gradients (accumulating) and skips the reduce-scatter."""
        for m in (self.modules() if recurse else [self]):
            if isinstance(m, FSDPModule):
                m._fsdp_state.requires_gradient_sync = requires_gradient_sync

    def held_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The tensors FSDP keeps besides the module's parameters (``ts.held_bytes`` counts them)."""
        return self._fsdp_state.held_tensors()


_CLASSES: dict[type, type] = {}


def fully_shard(module: nn.Module, mesh_or_comm: Any, *, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``module``'s parameters over the ranks of ``mesh_or_comm`` (a ``Comm`` or a 1-D ``DeviceMesh``);
    returns ``module`` itself, now an ``FSDPModule`` (module docstring)."""
    comm = data_parallel_group(mesh_or_comm, "fully_shard")
    if isinstance(module, FSDPModule):
        raise ValueError(f"rank {comm.rank}: fully_shard called twice on {type(module).__name__}")
    if next(module.parameters(), None) is None:
        raise ValueError(f"rank {comm.rank}: fully_shard got a module with no parameters ({type(module).__name__}): "
                         f"there is nothing to shard")
    if not isinstance(reshard_after_forward, bool):
        raise ValueError(f"rank {comm.rank}: reshard_after_forward must be True or False, got {reshard_after_forward!r}")
    state = FSDPState(module, comm, reshard_after_forward)
    cls = type(module)
    module.__class__ = _CLASSES.setdefault(cls, type(f"FSDP{cls.__name__}", (FSDPModule, cls), {}))
    module._fsdp_state = state
    module.register_forward_pre_hook(state.pre_forward, prepend=True)
    module.register_forward_hook(state.post_forward)
    return module
