"""The collectives, in one table: how each is called, what it moves, what it costs, how it is drawn.

Every other module reads ``OPS`` (argument checks and messages, what the simulator computes, the
trace's wire bytes, the cost model's latency steps, the plots' colours). Adding a collective is one
entry here, its public method on ``Comm`` (comm.py) and its ``torch.distributed`` call (dist/).

``Op.outputs`` is a collective's meaning: from every rank's input, in group-rank order, what each
rank gets back. The simulator runs it on the inputs its ranks post (sim/runtime.py); one rank of a
symmetric world runs it on copies of its own input, for the shapes (sim/solo.py).

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
from typing import Callable

import torch

# Reduce ops a collective accepts, with the torch.distributed.ReduceOp member of each.
REDUCE_OPS: dict[str, str] = {"sum": "SUM", "avg": "AVG", "max": "MAX", "min": "MIN", "prod": "PRODUCT"}


@dataclass(frozen=True)
class Op:
    """One collective: its arguments after the tensor, its wire bytes and latency steps, its colour."""

    name: str
    params: tuple[str, ...]  # argument names the backends compare between ranks, in order (for messages)
    wire: Callable[[int, int, int], tuple[int, int]]  # (nbytes, p, position) -> (sent, received), p >= 2
    latency_steps: Callable[[int], int]  # p -> messages one rank pays α for, p >= 2
    color: str  # in every figure
    outputs: Callable[..., list] | None = None  # (inputs in group-rank order, *params) -> each rank's result;
    # None for point to point, and for new_group (a rendezvous that registers the group: sim/runtime.py)


def _same_both_ways(moved: Callable[[int, int], int]) -> Callable[[int, int, int], tuple[int, int]]:
    def wire(nbytes: int, p: int, position: int) -> tuple[int, int]:
        return moved(nbytes, p), moved(nbytes, p)
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


def _ring(p: int) -> int:
    return p - 1


def _two_rings(p: int) -> int:
    return 2 * (p - 1)


def _one_message(p: int) -> int:
    """A send or a receive; or all_to_all, whose p−1 sends and receives NCCL posts at once (grouped)."""
    return 1


# In plot order (the stacking order of the bars); the colours are matplotlib's "Set2" in that order.
OPS: dict[str, Op] = {op.name: op for op in (
    Op("all_reduce", ("op",), _same_both_ways(lambda n, p: 2 * (p - 1) * n // p), _two_rings, "#66c2a5",
       lambda xs, op: _copies(_reduced(xs, op), len(xs))),
    Op("all_gather", ("dim",), _same_both_ways(lambda n, p: (p - 1) * n), _ring, "#fc8d62",
       lambda xs, dim: _copies(torch.cat(xs, dim), len(xs))),
    Op("reduce_scatter", ("dim", "op"), _same_both_ways(lambda n, p: (p - 1) * n // p), _ring, "#8da0cb",
       lambda xs, dim, op: [c.clone() for c in _reduced(xs, op).chunk(len(xs), dim)]),
    Op("all_to_all", ("scatter_dim", "gather_dim"), _same_both_ways(lambda n, p: (p - 1) * n // p), _one_message,
       "#e78ac3", _all_to_all),
    Op("send", ("dst",), lambda n, p, position: (n, 0), _one_message, "#a6d854"),
    Op("recv", ("src",), lambda n, p, position: (0, n), _one_message, "#ffd92f"),
    Op("broadcast", ("src",), _broadcast, _ring, "#e5c494", lambda xs, src: [xs[src].clone() for _ in xs]),
    Op("barrier", (), _same_both_ways(lambda n, p: 0), _two_rings, "#b3b3b3", lambda xs: [None] * len(xs)),
    Op("new_group", ("ranks",), _same_both_ways(lambda n, p: 0), lambda p: 0, "grey"),
)}


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
    entry = spec(op)
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
    names = OPS[op].params if op in OPS else ()
    args = [f"{n}={v!r}" for n, v in zip(names, params)]
    return f"{op}({', '.join(filter(None, [tensor, *args]))})"
