"""The per-rank communicator every parallel layer is written against.

``Comm`` checks arguments (a ``ValueError`` naming the rank, the op and the sizes), records a
``CommEvent`` per call, and hands the work to a backend: ``SimComm`` (virtual ranks, sim/runtime.py)
and ``SoloComm`` (one rank alone, sim/solo.py), both computing what ops.py's ``outputs`` says, or
``TorchComm`` (real ``torch.distributed``, dist/torch_comm.py). Collectives are functional: they
return new tensors that no other rank shares, and never touch autograd (see
core/mappings.py for the differentiable versions). Ranks (``rank``, ``src``, ``dst``,
``new_group``) are ranks *of this communicator's group*; ``CommEvent`` records global ranks. The
collectives themselves (arguments and their kinds, meaning, bytes, costs, torch.distributed calls) are
listed once, in ops.py: ``comm.collective(op, x, *params)`` checks, records and runs any of them, and
the named methods (``all_gather``, ``all_reduce``, ...) are one-line wrappers of its checked path.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any, Callable, Sequence

import torch

from .errors import group_text
from .ops import OPS, PARAM_KINDS, REDUCE_OPS, REQUIRED, Op
from .trace import CommEvent, Recorder


def normalized_dim(x: torch.Tensor, dim: int, where: str, name: str = "dim") -> int:
    """``dim`` of ``x`` as a non-negative index, or a ValueError that starts with ``where`` (e.g. the rank and op)."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        try:
            dim = operator.index(dim)  # a numpy or 0-d tensor integer; a float such as 0.0 is refused
        except TypeError:
            raise ValueError(f"{where} got {name}={dim!r} ({type(dim).__name__}): it must be an integer dim") from None
    if x.dim() == 0:
        raise ValueError(f"{where} got {name}={dim} for a 0-d tensor (shape ()): it needs at least one dim")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{where} got {name}={dim} for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def _integer(value: Any, where: str, name: str) -> int:
    """``value`` as an int (a bool or a float such as 1.0 is refused, not truncated)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{where}: {name} must be an integer rank, got {value!r} ({type(value).__name__})") from None


def _short_repr(x: Any) -> str:
    try:
        text = repr(x)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        return "unprintable"
    return text if len(text) <= 60 else text[:57] + "..."


class Completed:
    """The handle of a call that completed when it was made: ``wait()`` returns its result."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def wait(self) -> Any:
        return self.value


class Work:
    """Handle of an asynchronous call (isend, irecv, a collective with ``async_op=True``): ``wait()``
    returns its result (the received tensor, the collective's output; None for a send) and records a
    ``WaitMark`` the first time."""

    __slots__ = ("_wait_fn", "_recorder", "_event", "_result", "_done")

    def __init__(self, wait_fn, recorder: Recorder, event: CommEvent) -> None:
        self._wait_fn = wait_fn
        self._recorder = recorder
        self._event = event
        self._result: torch.Tensor | None = None
        self._done = False

    def wait(self) -> torch.Tensor | None:
        if not self._done:
            self._result = self._wait_fn()
            self._done = True
            self._recorder.record_wait(self._event)
        return self._result


class Comm(ABC):
    """One rank's view of a group of ranks."""

    backend: str
    axis: str | None = None  # set by ts.init_device_mesh on the groups it builds; recorded on every CommEvent

    def __init__(self, rank: int, group: tuple[int, ...], recorder: Recorder, group_label: str | None = None) -> None:
        self.rank = rank
        self.group = group
        self.world_size = len(group)
        self.recorder = recorder
        # Formatted once (every call's checks use it), and short (``group_text``). A backend with many ranks
        # passes the group's text, formatted once per group: 8,000 ranks each formatting the whole tuple
        # made starting a run quadratic.
        self._label = f"rank {rank} of group {group_label or group_text(group)}"

    @property
    def global_rank(self) -> int:
        return self.group[self.rank]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, group={self.group})"

    # ---- labels ---------------------------------------------------------------------------------

    def scope(self, name: str) -> AbstractContextManager[None]:
        """Label the calls made inside: ``with comm.scope("block0"), comm.scope("attn")`` → ``"block0/attn"``."""
        return self.recorder.push_scope(name)

    @property
    def current_scope(self) -> str:
        return self.recorder.scope

    def replay_scope(self, scope: str) -> AbstractContextManager[None]:
        """Record calls made inside (from a backward) under the scope their forward ran in."""
        return self.recorder.replay_scope(scope)

    def phase(self, name: str) -> AbstractContextManager[None]:
        """Record the calls made inside under phase ``name`` (one of ``tpsp_sim.core.trace.PHASES``), e.g.
        ``with comm.phase("grad_sync"):`` around gradient reductions called after backward."""
        return self.recorder.push_phase(name)

    # ---- collectives ----------------------------------------------------------------------------

    def collective(self, op: str, x: torch.Tensor | None = None, /, *args: Any, async_op: bool = False,
                   **kwargs: Any) -> Any:
        """Collective ``op`` of the op table (core/ops.py) on this rank's ``x``, its params given after it by
        position or name, each checked as its kind says (a ValueError naming the rank, the op, the argument and
        the sizes). ``async_op=True``: post it and return a ``Work`` whose ``wait()`` returns the result.
        Every collective in ``OPS`` is callable here on every backend; the named methods below are this call."""
        entry = OPS.get(op)
        if entry is None or entry.outputs is None:
            raise ValueError(f"{self._where('collective')}: {op!r} is not a collective; collectives are "
                             f"{sorted(name for name, e in OPS.items() if e.outputs is not None)}")
        if kwargs or len(args) != len(entry.params):
            args = self._bound(entry, args, kwargs)
        return self._checked(entry, x, args, async_op)

    def _checked(self, entry: Op, x: torch.Tensor | None, values: tuple, async_op: bool) -> Any:
        """Check ``x`` and ``values`` (every param of ``entry``, in order) as their kinds say, record the call and
        run it (``comm.collective`` once its arguments are bound; each named method directly)."""
        op = entry.name
        if entry.tensor:
            if not isinstance(x, torch.Tensor):
                self._tensor(op, x)
            recorded = x
        elif x is None:
            recorded = torch.empty(0)  # a call without a tensor (a barrier) moves no bytes
        else:
            raise ValueError(f"{self._where(op)} takes no tensor, got {type(x).__name__}")
        params = values
        if values:  # a loop, not a comprehension: no frame of its own on the path every call takes
            params = []
            for param, value in zip(entry.params, values):
                params.append(_CHECKS[param.kind](self, op, x, param.name, value))
        root = 0 if entry.root is None else params[entry.root]
        if async_op:
            event = self._record(op, recorded, root=root, blocking=False)
            return Work(self._post_collective(op, x, *params).wait, self.recorder, event)
        self._record(op, recorded, root=root)
        return self._collective(op, x, *params)

    def all_gather(self, x: torch.Tensor, dim: int = 0, async_op: bool = False) -> torch.Tensor | Work:
        """Concatenate every rank's ``x`` along ``dim``, in rank order. ``async_op=True``: post it and return
        a ``Work`` whose ``wait()`` returns the result (the same for every collective below)."""
        return self._checked(OPS["all_gather"], x, (dim,), async_op)

    def all_reduce(self, x: torch.Tensor, op: str = "sum", async_op: bool = False) -> torch.Tensor | Work:
        """Elementwise reduction of every rank's ``x`` (in rank order); ``op`` is one of ``REDUCE_OPS``
        ("avg": the sum divided by world_size). Every rank must pass the same ``op``."""
        return self._checked(OPS["all_reduce"], x, (op,), async_op)

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0, op: str = "sum",
                       async_op: bool = False) -> torch.Tensor | Work:
        """Reduce every rank's ``x``, then keep this rank's chunk of ``dim`` (its size divisible by world_size)."""
        return self._checked(OPS["reduce_scatter"], x, (dim, op), async_op)

    def broadcast(self, x: torch.Tensor, src: int = 0, async_op: bool = False) -> torch.Tensor | Work:
        """Every rank gets a copy of rank ``src``'s ``x`` (the other ranks' ``x`` gives shape and dtype)."""
        return self._checked(OPS["broadcast"], x, (src,), async_op)

    def all_to_all(self, x: torch.Tensor, scatter_dim: int, gather_dim: int,
                   async_op: bool = False) -> torch.Tensor | Work:
        """Chunk ``scatter_dim`` into world_size pieces, send piece j to rank j, concatenate what arrives along ``gather_dim``."""
        return self._checked(OPS["all_to_all"], x, (scatter_dim, gather_dim), async_op)

    def barrier(self) -> None:
        """Return once every rank of the group has called it."""
        self._checked(OPS["barrier"], None, (), False)

    # ---- point to point -------------------------------------------------------------------------

    def send(self, x: torch.Tensor, dst: int) -> None:
        """Blocking send: returns once rank ``dst`` has posted the matching receive (a rendezvous)."""
        self._tensor("send", x)
        dst = self._peer("send", dst, "dst")
        self._record("send", x, peer=dst)
        self._isend(x, dst).wait()

    def recv(self, like: torch.Tensor, src: int) -> torch.Tensor:
        """Blocking receive of a tensor shaped like ``like`` from rank ``src``."""
        self._tensor("recv", like, "like")
        src = self._peer("recv", src, "src")
        self._record("recv", like, peer=src)
        return self._irecv(like, src).wait()

    def isend(self, x: torch.Tensor, dst: int) -> Work:
        """Post a send; ``.wait()`` returns once it is matched. Do not change ``x`` before then."""
        self._tensor("isend", x)
        dst = self._peer("isend", dst, "dst")
        event = self._record("send", x, peer=dst, blocking=False)
        return Work(self._isend(x, dst).wait, self.recorder, event)

    def irecv(self, like: torch.Tensor, src: int) -> Work:
        """Post a receive; ``.wait()`` returns the received tensor."""
        self._tensor("irecv", like, "like")
        src = self._peer("irecv", src, "src")
        event = self._record("recv", like, peer=src, blocking=False)
        return Work(self._irecv(like, src).wait, self.recorder, event)

    def sendrecv(self, x: torch.Tensor, dst: int, src: int) -> torch.Tensor:
        """One ring shift: send ``x`` to ``dst`` and receive a tensor like it from ``src``, posted together."""
        self._tensor("sendrecv", x)
        dst = self._peer("sendrecv", dst, "dst")
        src = self._peer("sendrecv", src, "src")
        self._record("send", x, peer=dst)
        self._record("recv", x, peer=src, batched=True)
        return self._sendrecv(x, dst, src)

    # ---- groups ---------------------------------------------------------------------------------

    def new_group(self, ranks: Sequence[int]) -> "Comm | None":
        """A communicator over ``ranks`` (ranks of this group). Every rank of this group must call it,
        in the same order, with the same ranks; ranks outside ``ranks`` get None. As in
        ``torch.distributed.new_group``, the order given does not matter: the new group's ranks are
        sorted (``new_group([2, 0])``: rank 0 is group rank 0, and gathers in that order)."""
        return self._new_group(self._ranks("new_group", None, "ranks", ranks))

    # ---- argument checks ------------------------------------------------------------------------

    def _where(self, op: str) -> str:
        return f"{self._label}: {op}"

    def _bound(self, entry: Op, args: tuple, kwargs: dict) -> tuple:
        """The value of every param of ``entry``, in the table's order: from ``args``, else ``kwargs``, else its
        default."""
        declared = entry.params
        if len(args) > len(declared):
            raise ValueError(f"{self._where(entry.name)} takes {len(declared)} argument(s) after the tensor "
                             f"{tuple(p.name for p in declared)}, got {len(args)}: {_short_repr(args)}")
        values = []
        for i, param in enumerate(declared):
            if i < len(args):
                if param.name in kwargs:
                    raise ValueError(f"{self._where(entry.name)} got {param.name} both by position and by name")
                values.append(args[i])
            elif param.name in kwargs:
                values.append(kwargs.pop(param.name))
            elif param.default is REQUIRED:
                raise ValueError(f"{self._where(entry.name)} needs {param.name} ({PARAM_KINDS[param.kind]})")
            else:
                values.append(param.default)
        if kwargs:
            raise ValueError(f"{self._where(entry.name)} got unexpected argument(s) {sorted(kwargs)}; its "
                             f"arguments are {[p.name for p in declared]}")
        return tuple(values)

    # Each kind of param (ops.PARAM_KINDS; ``_CHECKS`` below): (op, x, the param's name, its value) -> the value
    # to use, or a ValueError naming the rank, the op, the argument and the sizes.

    def _dim(self, op: str, x: torch.Tensor, name: str, dim: Any) -> int:
        if type(dim) is int and -x.ndim <= dim < x.ndim:  # the common case, without formatting the message's start
            return dim % x.ndim
        return normalized_dim(x, dim, self._where(op), name)

    def _divisible_dim(self, op: str, x: torch.Tensor, name: str, dim: Any) -> int:
        dim = self._dim(op, x, name, dim)
        self._divisible(op, x, dim, name)
        return dim

    def _reduce_op(self, op: str, x: torch.Tensor, name: str, reduce_op: Any) -> str:
        if not isinstance(reduce_op, str) or reduce_op not in REDUCE_OPS:
            raise ValueError(f"{self._where(op)}: unknown reduce op {reduce_op!r}, expected one of {tuple(REDUCE_OPS)}")
        if reduce_op == "avg" and x.dtype == torch.bool:
            raise ValueError(f"{self._where(op)}: op='avg' of a bool tensor (shape {tuple(x.shape)}) has no bool "
                             f"result; reduce with 'sum', 'max' or 'min', or convert to a number dtype first")
        return reduce_op

    def _root(self, op: str, x: torch.Tensor, name: str, rank: Any) -> int:
        return self._peer(op, rank, name, allow_self=True)

    def _other_rank(self, op: str, x: torch.Tensor, name: str, rank: Any) -> int:
        return self._peer(op, rank, name)

    def _ranks(self, op: str, x: None, name: str, ranks: Sequence[int]) -> tuple[int, ...]:
        ranks = tuple(sorted(_integer(r, self._where(op), "every rank") for r in ranks))
        if not ranks or len(set(ranks)) != len(ranks) or not all(0 <= r < self.world_size for r in ranks):
            raise ValueError(f"rank {self.rank}: {op} needs distinct ranks in [0, {self.world_size}), "
                             f"got {list(ranks)}")
        return ranks

    def _divisible(self, op: str, x: torch.Tensor, dim: int, name: str) -> None:
        if x.shape[dim] % self.world_size:
            raise ValueError(f"{self._where(op)}: size {x.shape[dim]} of {name}={dim} (shape {tuple(x.shape)}) "
                             f"is not divisible by world_size {self.world_size}")

    def _tensor(self, op: str, x: Any, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{self._where(op)}: {name} must be a torch.Tensor, got {type(x).__name__}"
                             + ("" if x is None else f" ({_short_repr(x)})"))

    def _peer(self, op: str, peer: Any, name: str, allow_self: bool = False) -> int:
        peer = _integer(peer, self._where(op), name)
        if not 0 <= peer < self.world_size or (peer == self.rank and not allow_self):
            raise ValueError(f"{self._where(op)}: {name}={peer} must be {'a' if allow_self else 'another'} rank "
                             f"in [0, {self.world_size})")
        return peer

    def _record(self, op: str, x: torch.Tensor, *, root: int = 0, peer: int | None = None,
                blocking: bool = True, batched: bool = False) -> CommEvent:
        return self.recorder.record(op, x, self.group, self.rank, root=root,
                                    peer=None if peer is None else self.group[peer], blocking=blocking,
                                    batched=batched, axis=self.axis)

    # ---- backend primitives ---------------------------------------------------------------------
    # Arguments are checked and the call recorded; ranks are ranks of this group.

    @abstractmethod
    def _collective(self, op: str, x: torch.Tensor | None, *params: Any) -> Any:
        """Run collective ``op`` (an entry of ``OPS``) on ``x`` (None for a barrier) with its checked ``params``
        and return this rank's result."""

    def _post_collective(self, op: str, x: torch.Tensor | None, *params: Any) -> Any:
        """Start collective ``op`` and return a handle whose ``wait()`` returns its result. By default it runs
        to completion here: a backend that can overlap it (the simulator, torch.distributed) overrides this."""
        return Completed(self._collective(op, x, *params))

    @abstractmethod
    def _isend(self, x: torch.Tensor, dst: int): ...

    @abstractmethod
    def _irecv(self, like: torch.Tensor, src: int): ...

    @abstractmethod
    def _sendrecv(self, x: torch.Tensor, dst: int, src: int) -> torch.Tensor: ...

    @abstractmethod
    def _new_group(self, ranks: tuple[int, ...]) -> "Comm | None": ...


# How ``Comm`` checks and normalises each kind of param (ops.PARAM_KINDS): (comm, op, x, name, value) -> value.
_CHECKS: dict[str, Callable[[Comm, str, Any, str, Any], Any]] = {
    "dim": Comm._dim,
    "divisible dim": Comm._divisible_dim,
    "reduce op": Comm._reduce_op,
    "root": Comm._root,
    "peer": Comm._other_rank,
    "ranks": Comm._ranks,
}
