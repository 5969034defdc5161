"""One rank of a symmetric world: simulate one virtual rank's program without the others.

Many SPMD programs do the same thing on every rank up to a renaming of the ranks: on a device mesh,
rank q's program is rank 0's with every rank r replaced by r translated by q's coordinates (each
axis wrapping around). One transformer layer split by TP and a balanced (zigzag) context-parallel
attention is such a program: every rank computes the same FLOPs and sends the same bytes, to its
own neighbours. For those, one rank's trace gives every rank's, and one rank is enough to record it.

``run_solo`` runs ``fn`` for one rank on **meta tensors** (shapes, no values): a collective returns
what it would if every rank of the group had posted this rank's input (``OPS[op].outputs`` of ops.py
on copies of it), a receive a tensor like the one asked for. Nothing waits for anything. The events,
bytes and FLOPs are the ones the whole world's simulation records for that rank, provided the program
is symmetric; ``run_symmetric`` finds the ranks that must be simulated (one, unless some groups are
not whole mesh axes) and writes every rank's trace from theirs. ``tests/test_solo.py`` checks it
against a simulation of every rank, event by event, for every attention kind on a grid of meshes.

Cost: one rank's work instead of world_size ranks' (and no turns to hand over). The planner
simulates each layer this way (analysis/layer.py): a cp = 64 ring layer went from 64 ranks' work to one's.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from contextlib import nullcontext
from typing import Any, Callable

import torch

from ..core.comm import Comm
from ..core.flops import FlopCounter
from ..core.ops import OPS
from ..core.trace import CommEvent, CommTrace, ComputeSpan, Recorder, WaitMark


class _Done:
    """The handle of a send or receive that has nothing to wait for."""

    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor | None) -> None:
        self.value = value

    def wait(self) -> torch.Tensor | None:
        return self.value


class SoloComm(Comm):
    """One rank's communicator in a world that is not simulated: results have the shapes the whole
    world's would, on meta tensors (module docstring)."""

    backend = "solo"

    def _collective(self, op: str, x: torch.Tensor | None, *params: Any) -> Any:
        self._meta(op, x)
        return OPS[op].outputs([x] * self.world_size, *params)[self.rank]

    def _meta(self, op: str, x: torch.Tensor | None) -> None:
        if x is not None and x.device.type != "meta":
            raise ValueError(f"{self._where(op)}: run_solo simulates one rank on meta tensors only, got a tensor on "
                             f"{x.device} (shape {tuple(x.shape)}); use ts.run to simulate every rank with values")

    def _all_gather(self, x, dim):
        return self._collective("all_gather", x, dim)

    def _all_reduce(self, x, op):
        return self._collective("all_reduce", x, op)

    def _reduce_scatter(self, x, dim, op):
        return self._collective("reduce_scatter", x, dim, op)

    def _broadcast(self, x, src):
        return self._collective("broadcast", x, src)

    def _all_to_all(self, x, scatter_dim, gather_dim):
        return self._collective("all_to_all", x, scatter_dim, gather_dim)

    def _barrier(self):
        self._collective("barrier", None)

    def _isend(self, x, dst):
        self._meta("send", x)
        return _Done(None)

    def _irecv(self, like, src):
        self._meta("recv", like)
        return _Done(torch.empty_like(like))

    def _sendrecv(self, x, dst, src):
        self._meta("sendrecv", x)
        return torch.empty_like(x)

    def _new_group(self, ranks):
        if self.rank not in ranks:
            return None
        return SoloComm(ranks.index(self.rank), tuple(self.group[r] for r in ranks), self.recorder)


def run_solo(fn: Callable[..., Any], *args: Any, world_size: int, rank: int = 0, count_flops: bool = False,
             **kwargs: Any) -> CommTrace:
    """The trace of ``fn(comm, *args, **kwargs)`` on rank ``rank`` of ``world_size`` ranks, simulating that rank
    alone (module docstring: meta tensors, a program that is the same on every rank up to renaming).
    ``count_flops``: record its FLOPs between communications, for ``ts.timeline``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"run_solo: rank={rank} is not in [0, world_size={world_size})")
    recorder = Recorder(rank)
    recorder.flop_counter = FlopCounter(recorder.label) if count_flops else None
    with recorder.flop_counter or nullcontext():
        fn(SoloComm(rank, tuple(range(world_size)), recorder), *args, **kwargs)
        recorder.finish()
    return CommTrace(recorder.events, recorder.waits, recorder.compute, world_size)


def run_symmetric(fn: Callable[..., Any], *args: Any, shape: tuple[int, ...], count_flops: bool = False,
                  **kwargs: Any) -> CommTrace:
    """Every rank's trace of ``fn`` on a mesh of ``shape`` (row-major, the last axis fastest), simulating as few
    ranks as the program's symmetry allows (module docstring; meta tensors).

    1. Rank 0 alone gives its groups. Along each axis, the period is the smallest shift that maps each of
       those groups onto itself or off it entirely (1 for a mesh axis's own groups; 4 along tp for the
       groups of 4 tp ranks that share a replicated K/V head).
    2. Each rank of the box [0, period) is simulated alone: one rank when every period is 1.
    3. Every other rank's trace is its box rank's, translated by a multiple of the periods (``translated``).
    4. Checked: each call's groups partition the ranks that make it, every send meets its receive;
       else a ValueError (the program is not symmetric: simulate every rank with ``ts.run``).

    The check sees groups and transfers that do not close; it cannot see a rank whose own program differs
    from its box rank's translate, since that rank is never run: the symmetry is the caller's claim (for
    the planner's layers, tests/test_solo.py holds it against simulating every rank).
    """
    world_size = math.prod(shape)
    first = run_solo(fn, *args, world_size=world_size, count_flops=count_flops, **kwargs)
    period = _period(first, shape)
    box = [r for r in range(world_size) if all(c < p for c, p in zip(_coordinates(r, shape), period))]
    traces = [first] + [run_solo(fn, *args, world_size=world_size, rank=r, count_flops=count_flops, **kwargs)
                        for r in box[1:]]
    trace = translated(traces, shape, period)
    _check_symmetric(trace, shape)
    return trace


def translated(traces: list[CommTrace], shape: tuple[int, ...], period: tuple[int, ...]) -> CommTrace:
    """Every rank's trace of a mesh of ``shape``, from the traces of the ranks of the box [0, ``period``).

    Rank q's program is its box rank's with every rank renamed by the translation that takes one to the
    other (coordinates added, each axis modulo its size): the same calls, bytes and FLOPs, on the
    translated groups and peers. A broadcast's bytes depend on the rank's distance from its root, so a
    trace with one is refused.
    """
    world_size = math.prod(shape)
    by_rank: dict[int, CommTrace] = {}
    for trace in traces:
        ranks = sorted({e.rank for e in trace.events} | {c.rank for c in trace.compute})
        if len(ranks) != 1:
            raise ValueError(f"translated: needs traces of one rank each, got one of ranks {ranks}")
        if trace.world_size not in (0, world_size):
            raise ValueError(f"translated: a trace is of {trace.world_size} ranks, the mesh {shape} has {world_size}")
        by_rank[ranks[0]] = trace
    if any(e.op == "broadcast" for trace in traces for e in trace.events):
        raise ValueError("translated: a broadcast's bytes depend on each rank's distance from its root; "
                         "simulate every rank (ts.run) instead")
    events: list[CommEvent] = []
    waits: list[WaitMark] = []
    compute: list[ComputeSpan] = []
    for q in range(world_size):
        coordinates = _coordinates(q, shape)
        home = [c % p for c, p in zip(coordinates, period)]
        box_rank = _index(home, shape)
        if box_rank not in by_rank:
            raise ValueError(f"translated: rank {q} needs the trace of rank {box_rank}, which is not given")
        trace, rename = by_rank[box_rank], _Renaming(shape, [c - h for c, h in zip(coordinates, home)])
        events += [_moved(e, q, rename) for e in trace.events]
        waits += [WaitMark(q, w.seq, w.event_seq) for w in trace.waits]
        compute += [ComputeSpan(q, c.seq, c.flops, c.scope, c.phase) for c in trace.compute]
    return CommTrace(events, waits, compute, world_size)


def _coordinates(rank: int, shape: tuple[int, ...]) -> list[int]:
    coordinates = []
    for size in reversed(shape):
        rank, c = divmod(rank, size)
        coordinates.append(c)
    return coordinates[::-1]


def _index(coordinates: list[int], shape: tuple[int, ...]) -> int:
    index = 0
    for c, size in zip(coordinates, shape):
        index = index * size + c % size
    return index


class _Renaming:
    """Rank r -> r translated by ``shift`` on the mesh torus; groups renamed once each."""

    def __init__(self, shape: tuple[int, ...], shift: list[int]) -> None:
        self.shape, self.shift = shape, shift
        self.groups: dict[tuple[int, ...], tuple[int, ...]] = {}

    def rank(self, r: int) -> int:
        return _index([c + s for c, s in zip(_coordinates(r, self.shape), self.shift)], self.shape)

    def group(self, g: tuple[int, ...]) -> tuple[int, ...]:
        if g not in self.groups:
            self.groups[g] = tuple(sorted(self.rank(r) for r in g))
        return self.groups[g]


def _moved(e: CommEvent, q: int, rename: _Renaming) -> CommEvent:
    return CommEvent(e.op, q, rename.group(e.group), e.shape, e.dtype, e.nbytes, e.sent_bytes, e.recv_bytes,
                     e.scope, e.phase, e.seq, None if e.peer is None else rename.rank(e.peer), e.blocking,
                     e.batched, e.axis)


def _period(trace: CommTrace, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per axis, the smallest shift (a divisor of its size) that maps each group of ``trace`` onto itself or
    onto ranks all outside it."""
    groups = {frozenset(e.group) for e in trace.events}
    period = []
    for axis, size in enumerate(shape):
        for p in (d for d in range(1, size + 1) if size % d == 0):
            shift = [p if a == axis else 0 for a in range(len(shape))]
            rename = _Renaming(shape, shift)
            if all((moved := frozenset(rename.rank(r) for r in g)) == g or not moved & g for g in groups):
                period.append(p)
                break
    return tuple(period)


def _check_symmetric(trace: CommTrace, shape: tuple[int, ...]) -> None:
    """ValueError unless the k-th call of every rank on a group is made by exactly that group's ranks, and the
    k-th send from s to d meets the k-th receive of d from s."""
    members: dict[tuple, set[int]] = defaultdict(set)
    calls: Counter = Counter()
    transfers: Counter = Counter()
    for e in trace.events:
        if e.op in ("send", "recv"):
            src, dst = (e.rank, e.peer) if e.op == "send" else (e.peer, e.rank)
            transfers[src, dst, e.op] += 1
        else:
            key = (e.group, e.rank)
            members[e.group, calls[key]].add(e.rank)
            calls[key] += 1
    for (group, k), ranks in members.items():
        if ranks != set(group):
            raise ValueError(f"run_symmetric: the program on the mesh {shape} is not symmetric under its translations: "
                             f"call {k} on group {group} is made by ranks {sorted(ranks)}; simulate every rank (ts.run)")
    for (src, dst, op), n in transfers.items():
        other = "recv" if op == "send" else "send"
        if transfers[src, dst, other] != n:
            raise ValueError(f"run_symmetric: the program on the mesh {shape} is not symmetric under its translations: "
                             f"{n} {op}(s) from rank {src} to rank {dst} but {transfers[src, dst, other]} {other}(s); "
                             "simulate every rank (ts.run)")
