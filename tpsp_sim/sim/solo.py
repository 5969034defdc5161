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
not whole mesh axes) and returns a ``Symmetric``: their traces, from which ``trace()`` writes every
rank's, and which ``ts.timeline`` lays out on a cluster replaying only the ranks the cluster's
nodes tell apart. ``tests/test_solo.py`` checks it against a simulation of every rank, event by
event, for every attention kind on a grid of meshes.

Cost: one rank's work instead of world_size ranks' (and no turns to hand over). The planner
simulates each layer this way (analysis/layer.py): a cp = 64 ring layer went from 64 ranks' work to one's.
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from ..core.comm import Comm, Completed
from ..core.flops import FlopCounter
from ..core.ops import OPS
from ..core.trace import CommEvent, CommTrace, ComputeSpan, Recorder, WaitMark


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

    def _isend(self, x, dst):
        self._meta("send", x)
        return Completed(None)

    def _irecv(self, like, src):
        self._meta("recv", like)
        return Completed(torch.empty_like(like))

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


@dataclass(frozen=True)
class Symmetric:
    """A program on a mesh of ``shape`` (row-major, the last axis fastest), known by the traces of the ranks
    of the box [0, ``period``): every other rank's is its box rank's translated (``run_symmetric``)."""

    box: CommTrace  # the box ranks' events, waits and FLOPs
    shape: tuple[int, ...]
    period: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return math.prod(self.shape)

    @property
    def box_ranks(self) -> list[int]:
        """The ranks whose traces are kept: every coordinate below its period."""
        return self._box(self.period)

    def _box(self, period: tuple[int, ...]) -> list[int]:
        return [r for r in range(self.world_size) if all(c < p for c, p in zip(_coordinates(r, self.shape), period))]

    def home(self, rank: int) -> tuple[int, list[int]]:
        """(the box rank whose trace ``rank``'s is, the shift of coordinates from it to ``rank``)."""
        coordinates = _coordinates(rank, self.shape)
        home = [c % p for c, p in zip(coordinates, self.period)]
        return _index(home, self.shape), [c - h for c, h in zip(coordinates, home)]

    def translate(self, rank: int, shift: list[int]) -> int:
        """``rank`` moved by ``shift`` on the mesh torus."""
        return _index([c + s for c, s in zip(_coordinates(rank, self.shape), shift)], self.shape)

    def trace(self) -> CommTrace:
        """Every rank's trace."""
        return self._traces_of(range(self.world_size))

    def coarsened(self, period: tuple[int, ...]) -> "Symmetric":
        """The same program known by the larger box [0, ``period``) (each a multiple of this one's)."""
        if any(new % old or self_size % new for new, old, self_size in zip(period, self.period, self.shape)):
            raise ValueError(f"Symmetric.coarsened: period {period} must be multiples of {self.period} "
                             f"dividing the mesh {self.shape}")
        return Symmetric(self._traces_of(self._box(period)), self.shape, tuple(period))

    def _traces_of(self, ranks: Iterable[int]) -> CommTrace:
        by_rank = self.box.programs()
        events: list[CommEvent] = []
        waits: list[WaitMark] = []
        compute: list[ComputeSpan] = []
        for q in ranks:
            home, shift = self.home(q)
            rename = _Renaming(self, shift)
            for item in by_rank.get(home, ()):
                if isinstance(item, CommEvent):
                    events.append(_moved(item, q, rename))
                elif isinstance(item, WaitMark):
                    waits.append(WaitMark(q, item.seq, item.event_seq))
                else:
                    compute.append(ComputeSpan(q, item.seq, item.flops, item.scope, item.phase))
        return CommTrace(events, waits, compute, self.world_size)


def run_symmetric(fn: Callable[..., Any], *args: Any, shape: tuple[int, ...], count_flops: bool = False,
                  **kwargs: Any) -> Symmetric:
    """``fn`` on a mesh of ``shape`` (row-major, the last axis fastest), simulating as few ranks as the
    program's symmetry allows (module docstring; meta tensors).

    1. Rank 0 alone gives its groups. Along each axis, the period is the smallest shift that maps each of
       those groups onto itself or off it entirely (1 for a mesh axis's own groups; 4 along tp for the
       groups of 4 tp ranks that share a replicated K/V head).
    2. Each rank of the box [0, period) is simulated alone: one rank when every period is 1. Every other
       rank's trace is its box rank's, translated by a multiple of the periods (``Symmetric.trace()``).
    3. Checked on the box: the k-th call of a box rank on a group is the k-th call of every member (as
       its own box rank makes it, translated), every send meets its receive; else a ValueError (the
       program is not symmetric: simulate every rank with ``ts.run``).

    The check sees groups and transfers that do not close; it cannot see a rank whose own program differs
    from its box rank's translate, since that rank is never run: the symmetry is the caller's claim (for
    the planner's layers, tests/test_solo.py holds it against simulating every rank). A broadcast's bytes
    depend on each rank's distance from its root: a program with one is refused.
    """
    world_size = math.prod(shape)
    first = run_solo(fn, *args, world_size=world_size, count_flops=count_flops, **kwargs)
    period = _period(first, shape)
    box = Symmetric(first, shape, period).box_ranks
    traces = [first] + [run_solo(fn, *args, world_size=world_size, rank=r, count_flops=count_flops, **kwargs)
                        for r in box[1:]]
    merged = CommTrace([e for t in traces for e in t.events], [w for t in traces for w in t.waits],
                       [c for t in traces for c in t.compute], world_size)
    if any(e.op == "broadcast" for e in merged.events):
        raise ValueError("run_symmetric: a broadcast's bytes depend on each rank's distance from its root; "
                         "simulate every rank (ts.run) instead")
    symmetric = Symmetric(merged, shape, period)
    _check_symmetric(symmetric)
    return symmetric


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
    """Rank r -> r translated by ``shift``; groups renamed once each."""

    def __init__(self, symmetric: Symmetric, shift: list[int]) -> None:
        self.symmetric, self.shift = symmetric, shift
        self.groups: dict[tuple[int, ...], tuple[int, ...]] = {}

    def rank(self, r: int) -> int:
        return self.symmetric.translate(r, self.shift)

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
    unit = Symmetric(trace, shape, (1,) * len(shape))
    period = []
    for axis, size in enumerate(shape):
        for p in (d for d in range(1, size + 1) if size % d == 0):
            shift = [p if a == axis else 0 for a in range(len(shape))]
            if all((moved := frozenset(unit.translate(r, shift) for r in g)) == g or not moved & g for g in groups):
                period.append(p)
                break
    return tuple(period)


def _calls_of(trace: CommTrace) -> dict[tuple[int, int], tuple]:
    """{(rank, seq): the call it is}: ("collective", group, k) for a rank's k-th collective on a group, or
    ("send" | "recv", group, src, dst, k) for the k-th transfer from src to dst."""
    made: Counter = Counter()
    calls = {}
    for e in sorted(trace.events, key=lambda e: (e.rank, e.seq)):
        if e.op in ("send", "recv"):
            src, dst = (e.rank, e.peer) if e.op == "send" else (e.peer, e.rank)
            counter = (e.op, e.group, src, dst)
            calls[e.rank, e.seq] = (*counter, made[counter])
        else:
            counter = ("collective", e.group, e.rank)
            calls[e.rank, e.seq] = ("collective", e.group, made[counter])
        made[counter] += 1
    return calls


def _check_symmetric(symmetric: Symmetric) -> None:
    """ValueError unless every member of a box rank's k-th call on a group makes it too (its box rank, the
    call translated), and every transfer's other side posts it (module docstring of ``run_symmetric``)."""
    made = set(_calls_of(symmetric.box).values())
    shape = symmetric.shape
    for call in sorted(made, key=str):
        kind, group = call[0], call[1]
        if kind == "collective":
            needed = [(m, group) for m in group]
        else:
            src, dst = call[2], call[3]
            needed = [(dst if kind == "send" else src, group)]
        for m, g in needed:
            home, shift = symmetric.home(m)
            back = _Renaming(symmetric, [-s for s in shift])
            if kind == "collective":
                other = ("collective", back.group(g), call[-1])
            else:
                other = ("recv" if kind == "send" else "send", back.group(g), back.rank(call[2]), back.rank(call[3]),
                         call[-1])
            if other not in made:
                what = (f"call {call[-1]} on group {group}" if kind == "collective"
                        else f"{kind} {call[-1]} from rank {call[2]} to rank {call[3]}")
                raise ValueError(f"run_symmetric: the program on the mesh {shape} is not symmetric under its "
                                 f"translations: rank {m} does not make {what}; simulate every rank (ts.run)")
