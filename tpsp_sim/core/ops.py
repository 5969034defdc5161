"""The collectives, in one table: how each is called, what it means, what it moves, what it costs,
how real torch.distributed runs it, how it is drawn.

Every other module reads ``OPS``: ``Comm.collective`` checks and normalises the arguments each
``Param`` declares (comm.py, with the messages), the simulator computes ``outputs``, the trace
records ``wire`` bytes, the cost model prices ``latency_steps``, ``TorchComm`` calls ``torch_call``
(dist/torch_comm.py), the plots use ``color``. **Adding a collective is one entry here** (and its row
in the table below, which the README repeats; tests/test_ops.py holds them together): it is at once
callable as ``comm.collective("name", x, *params)`` on virtual ranks (``ts.run``), on one rank alone
(``run_solo``) and on real processes (``ts.run(..., backend="gloo")``), recorded and priced
(tests/test_new_collective.py adds one in a test). A named method on ``Comm`` (``comm.all_gather``)
is a one-line wrapper, for readability only.

``Op.outputs`` is a collective's meaning: from every rank's input, in group-rank order, what each
rank gets back. The simulator runs it on the inputs its ranks post (sim/runtime.py); one rank of a
symmetric world runs it on copies of its own input, for the shapes (sim/solo.py). ``Op.torch_call`` is
the same on ``torch.distributed``: given the process group, this rank's input, the checked params
and ``async_op``, it posts the tensor-native call a production code base would make and returns
(torch's work handle, or None once done; a function giving the result once the work is done).

Per-rank wire bytes, ring algorithms on p ranks (the nccl-tests convention); n or N is the bytes of
this rank's input, and fractions are rounded down to whole bytes. The latency steps are the
messages a rank pays the per-message latency α for (``ts.cost``). The README's table is checked
against this one, and both against ``OPS``, by tests/test_ops.py.

| op | input per rank | sent per rank | received per rank | latency steps |
|---|---|---|---|---|
| all_gather | shard of n bytes | (p−1)·n | (p−1)·n | p−1 |
| reduce_scatter | N | (p−1)/p·N | (p−1)/p·N | p−1 |
| all_reduce | N | 2(p−1)/p·N | 2(p−1)/p·N | 2(p−1) |
| all_to_all | N | (p−1)/p·N | (p−1)/p·N | 1 |
| broadcast | N | N (0 on the last rank) | N (0 on the root) | p−1 |
| send | n | n | 0 | 1 |
| recv | n | 0 | n | 1 |
| barrier | nothing | 0 | 0 | 2(p−1) |

Broadcast is a pipelined ring starting at the root: the root only sends, the last rank of the ring
only receives, every other rank does both. A barrier is priced as an all_reduce of nothing. On one
rank (p = 1) nothing moves. ``new_group`` is a rendezvous of the group too (it moves no data and
is not recorded); it is listed so that messages can name its argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import torch
import torch.distributed as dist

# Reduce ops a collective accepts, with the torch.distributed.ReduceOp member of each.
REDUCE_OPS: dict[str, str] = {"sum": "SUM", "avg": "AVG", "max": "MAX", "min": "MIN", "prod": "PRODUCT"}

# The kinds of argument a collective takes after its tensor: what ``Comm`` checks and makes of each
# (comm.py, ``Comm._CHECKS``; a ValueError naming the rank, the op, the argument and the sizes).
PARAM_KINDS: dict[str, str] = {
    "dim": "an integer dim of the tensor, made non-negative",
    "divisible dim": "a dim as above whose size world_size divides",
    "reduce op": "one of REDUCE_OPS ('avg' of a bool tensor is refused)",
    "root": "an integer rank of the group, this rank included (recorded as the call's root)",
    "peer": "an integer rank of the group other than this one",
    "ranks": "distinct integer ranks of the group, sorted",
}
REQUIRED = object()  # the default of a Param that has none


@dataclass(frozen=True)
class Param:
    """An argument of a collective after its tensor: its name (in calls and messages), its kind
    (``PARAM_KINDS``), its default (``REQUIRED``: none)."""

    name: str
    kind: str
    default: Any = REQUIRED

    def __post_init__(self) -> None:
        if self.kind not in PARAM_KINDS:
            raise ValueError(f"Param {self.name!r}: unknown kind {self.kind!r}; kinds are {list(PARAM_KINDS)}")


@dataclass(frozen=True)
class Op:
    """One collective: its arguments after the tensor, its meaning, its wire bytes and latency steps, its
    torch.distributed call, its colour (module docstring)."""

    name: str
    params: tuple[Param, ...]  # in call order; the backends compare their values between ranks
    wire: Callable[[int, int, int], tuple[int, int]]  # (nbytes, p, position) -> (sent, received), p >= 2
    latency_steps: Callable[[int], int]  # p -> messages one rank pays α for, p >= 2
    color: str  # in every figure
    outputs: Callable[..., list] | None = None  # (inputs in group-rank order, *params) -> each rank's result;
    # None for point to point, and for new_group (a rendezvous that registers the group: sim/runtime.py)
    torch_call: Callable[..., tuple[Any, Callable[[], Any]]] | None = None  # (pg, x, *params, async_op=) ->
    # (work or None, result): module docstring; None where ``outputs`` is
    tensor: bool = True  # takes a tensor (a barrier takes none)

    def __post_init__(self) -> None:
        if (self.outputs is None) != (self.torch_call is None):
            raise ValueError(f"Op {self.name!r}: a collective declares both its meaning (outputs) and its "
                             f"torch.distributed call (torch_call); point to point and new_group neither")

    @cached_property
    def root(self) -> int | None:
        """The index of the param of kind "root" (the rank a broadcast starts from), if any."""
        return next((i for i, p in enumerate(self.params) if p.kind == "root"), None)


def _same_both_ways(moved: Callable[[int, int], int]) -> Callable[[int, int, int], tuple[int, int]]:
    def wire(nbytes: int, p: int, position: int) -> tuple[int, int]:
        both = moved(nbytes, p)
        return both, both
    return wire


def _broadcast(nbytes: int, p: int, position: int) -> tuple[int, int]:
    """``position`` is the rank's distance from the root along the ring."""
    return (0 if position == p - 1 else nbytes), (0 if position == 0 else nbytes)


_REDUCE = {"sum": torch.Tensor.add_, "avg": torch.Tensor.add_, "prod": torch.Tensor.mul_,
           "max": lambda a, b: torch.maximum(a, b, out=a), "min": lambda a, b: torch.minimum(a, b, out=a)}


def _reduced(xs: list[torch.Tensor], op: str) -> torch.Tensor:
    """Reduce in rank order (bitwise reproducible); "avg" is the rank-order sum divided by p."""
    acc = xs[0].clone()
    for x in xs[1:]:
        _REDUCE[op](acc, x)
    if op == "avg":
        acc = acc / len(xs) if not acc.is_floating_point() else acc.div_(len(xs))
    return acc


def _copies(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """One result per rank, none shared."""
    return [x] + [x.clone() for _ in range(n - 1)]


def _all_to_all(xs: list[torch.Tensor], scatter_dim: int, gather_dim: int) -> list[torch.Tensor]:
    """Rank i gets piece i of every rank's ``scatter_dim``, concatenated along ``gather_dim`` in rank order."""
    pieces = [x.chunk(len(xs), scatter_dim) for x in xs]
    return [torch.cat([p[i] for p in pieces], gather_dim) for i in range(len(xs))]


# ---- how torch.distributed runs each (``Op.torch_call``) --------------------------------------------
# torch 2.13 renamed these two (the old names warn FutureWarning); older torch has only the old names
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def _torch_op(op: str) -> Any:
    """The ReduceOp of ``op``; gloo has no AVG, so "avg" sums and ``_averaged`` divides, as the simulator."""
    return getattr(dist.ReduceOp, REDUCE_OPS["sum" if op == "avg" else op])


def _averaged(out: torch.Tensor, op: str, p: int) -> torch.Tensor:
    return out / p if op == "avg" else out


def _torch_all_gather(pg, x, dim, *, async_op):
    x = x.detach().movedim(dim, 0).contiguous()
    out = x.new_empty((pg.size() * x.shape[0], *x.shape[1:]))
    return _all_gather_single(out, x, group=pg, async_op=async_op), lambda: out.movedim(0, dim).contiguous()


def _torch_all_reduce(pg, x, op, *, async_op):
    out = x.detach().clone()
    work = dist.all_reduce(out, op=_torch_op(op), group=pg, async_op=async_op)
    return work, lambda: _averaged(out, op, pg.size())


def _torch_reduce_scatter(pg, x, dim, op, *, async_op):
    x = x.detach().movedim(dim, 0).contiguous()
    out = x.new_empty((x.shape[0] // pg.size(), *x.shape[1:]))
    work = _reduce_scatter_single(out, x, op=_torch_op(op), group=pg, async_op=async_op)
    return work, lambda: _averaged(out.movedim(0, dim).contiguous(), op, pg.size())


def _torch_all_to_all(pg, x, scatter_dim, gather_dim, *, async_op):
    pieces = torch.stack(x.detach().chunk(pg.size(), scatter_dim)).contiguous()  # pieces[j] goes to rank j
    out = torch.empty_like(pieces)
    work = dist.all_to_all_single(out, pieces, group=pg, async_op=async_op)
    return work, lambda: torch.cat(out.unbind(0), gather_dim)


def _torch_broadcast(pg, x, src, *, async_op):
    out = x.detach().clone()
    return dist.broadcast(out, src=dist.get_global_rank(pg, src), group=pg, async_op=async_op), lambda: out


def _torch_barrier(pg, x, *, async_op):
    return dist.barrier(group=pg, async_op=async_op), lambda: None


# ---- latency steps ---------------------------------------------------------------------------------

def _ring(p: int) -> int:
    return p - 1


def _two_rings(p: int) -> int:
    return 2 * (p - 1)


def _one_message(p: int) -> int:
    """A send or a receive; or all_to_all, whose p−1 sends and receives NCCL posts at once (grouped)."""
    return 1


# In plot order (the stacking order of the bars); the colours are matplotlib's "Set2" in that order.
OPS: dict[str, Op] = {op.name: op for op in (
    Op("all_reduce", (Param("op", "reduce op", "sum"),), _same_both_ways(lambda n, p: 2 * (p - 1) * n // p),
       _two_rings, "#66c2a5", lambda xs, op: _copies(_reduced(xs, op), len(xs)), _torch_all_reduce),
    Op("all_gather", (Param("dim", "dim", 0),), _same_both_ways(lambda n, p: (p - 1) * n), _ring, "#fc8d62",
       lambda xs, dim: _copies(torch.cat(xs, dim), len(xs)), _torch_all_gather),
    Op("reduce_scatter", (Param("dim", "divisible dim", 0), Param("op", "reduce op", "sum")),
       _same_both_ways(lambda n, p: (p - 1) * n // p), _ring, "#8da0cb",
       lambda xs, dim, op: [c.clone() for c in _reduced(xs, op).chunk(len(xs), dim)], _torch_reduce_scatter),
    Op("all_to_all", (Param("scatter_dim", "divisible dim"), Param("gather_dim", "dim")),
       _same_both_ways(lambda n, p: (p - 1) * n // p), _one_message, "#e78ac3", _all_to_all, _torch_all_to_all),
    Op("send", (Param("dst", "peer"),), lambda n, p, position: (n, 0), _one_message, "#a6d854"),
    Op("recv", (Param("src", "peer"),), lambda n, p, position: (0, n), _one_message, "#ffd92f"),
    Op("broadcast", (Param("src", "root", 0),), _broadcast, _ring, "#e5c494",
       lambda xs, src: [xs[src].clone() for _ in xs], _torch_broadcast),
    Op("barrier", (), _same_both_ways(lambda n, p: 0), _two_rings, "#b3b3b3", lambda xs: [None] * len(xs),
       _torch_barrier, tensor=False),
    Op("new_group", (Param("ranks", "ranks"),), _same_both_ways(lambda n, p: 0), lambda p: 0, "grey"),
)}


def recorded_ops() -> tuple[str, ...]:
    """The ops a CommEvent can have: every entry but new_group (which moves nothing and is not recorded)."""
    return tuple(op for op in OPS if op != "new_group")


def spec(op: str) -> Op:
    """The table entry of ``op`` (a ``ValueError`` naming the known ops if there is none)."""
    if op not in OPS:
        raise ValueError(f"unknown communication op {op!r}; ops are {sorted(OPS)}")
    return OPS[op]


def wire_bytes(op: str, nbytes: int, world_size: int, index: int = 0, root: int = 0) -> tuple[int, int]:
    """(sent, received) bytes of one rank for ``op`` on ``world_size`` ranks; ``nbytes`` is its input.

    ``index`` is the rank's position in the group and ``root`` the broadcast source (group ranks).
    See the table in this module's docstring.
    """
    entry = OPS.get(op) or spec(op)  # every recorded call comes here: the common case first
    if _alone(op, world_size):
        return 0, 0
    return entry.wire(nbytes, world_size, (index - root) % world_size)


def latency_steps(op: str, world_size: int) -> int:
    """Messages one rank pays the latency α for in ``op`` on ``world_size`` ranks (0 on one rank)."""
    entry = spec(op)
    if _alone(op, world_size):
        return 0
    return entry.latency_steps(world_size)


def _alone(op: str, world_size: int) -> bool:
    """A collective on one rank: nothing moves (a send or recv always has another rank at its end)."""
    return world_size == 1 and op not in ("send", "recv")


def describe_call(op: str, x: torch.Tensor | None, params: tuple) -> str:
    """``all_reduce(shape=(4,), dtype=torch.float32, op='sum')``: a call as error messages show it."""
    tensor = "" if x is None else f"shape={tuple(x.shape)}, dtype={x.dtype}"
    names = [p.name for p in OPS[op].params] if op in OPS else ()
    args = [f"{n}={v!r}" for n, v in zip(names, params)]
    return f"{op}({', '.join(filter(None, [tensor, *args]))})"
