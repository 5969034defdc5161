"""Each rank's program laid out in time on a cluster: where compute hides communication.

``ts.run(fn, ..., count_flops=True)`` records, per rank and in program order, the FLOPs computed
between communications (``ComputeSpan``), every call (``CommEvent``) and every wait on an
asynchronous one (``WaitMark``). ``timeline(trace, hw)`` replays them on ``hw``, a ``Cluster`` (or
a one-link ``Hardware``; see ``cluster.py`` for which link prices a call):

* compute takes flops / (mfu · peak_flops) (``mfu`` = 1 by default: the datasheet peak);
* a collective starts when the last rank of its group reaches it (the others idle until then) and
  takes ``collective_time`` on its group's link;
* the k-th send from rank s to rank d is the k-th receive of d from s. The transfer starts once
  both sides have posted it and the sender's outgoing and the receiver's incoming link are free
  (links are full duplex; one rank's sends leave one after another, as posted), and takes α + n/B
  on the link between s and d. A blocking send or recv (or a sendrecv, whose two halves are
  posted together) returns when its transfer ends; isend/irecv return at once, so the transfer runs
  while the rank computes, and the rank stalls at ``wait()`` only if the transfer has not ended by then;
* a collective posted with ``async_op=True`` (recorded non-blocking) likewise starts when the last rank of
  its group posts it and runs while each rank goes on computing; a rank stalls at its ``wait()`` (its
  ``WaitMark``) only until the collective ends (one never waited on is laid out all the same: the
  rank's end is then at least the collective's end).

``overlap_tp=True`` (off by default) models Megatron-LM's overlap of tensor parallelism's backward
communication with its matmuls (``LinearWithGradAccumulationAndAsyncCommunication``, both halves). The
sequence-parallel column layer (``_GatherLinear``) records its backward as

    all-gather X  ->  dX = dY W  ->  reduce-scatter dX  ->  dW = dYᵀ X

and Megatron launches each collective asynchronously and computes the matmul that does not need it:
dX = dY W under the all-gather that rebuilds X from its sequence shards, dW = dYᵀ X under the
reduce-scatter of dX. So with ``overlap_tp`` every backward ``all_gather`` and ``reduce_scatter`` on the
tensor-parallel axis (``axis`` "tp", or no mesh axis at all) is asynchronous: the rank goes on
computing, and waits for it before its next communication call or at its end. All-reduces are left
blocking: the plain-TP column layer records its all-reduce (f's backward) *after* the whole linear
backward, so what follows it is the previous layer's backward, which needs dX — overlapping it would
hide the all-reduce behind work that depends on it (Megatron overlaps it because its layer computes
dX, launches the all-reduce, then dW; this package's plain-TP layer does not). The forward's
all-gather and reduce-scatter stay blocking: Megatron hides those only with Transformer Engine's
chunked (userbuffers) GEMMs, which are not modelled, so the predicted TP exposure with
``overlap_tp=True`` is an upper bound on Megatron's (``ts.plan``'s ``overlap_tp`` is this one).

Per mesh axis: ``Timeline.exposed_by_axis(rank)`` splits the rank's exposed communication among the
axes of the calls (``CommEvent.axis``), so that compute + exposed per axis + idle = the rank's end.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable

from .cluster import Cluster, cluster
from .cost import event_time
from ..core.errors import SimulationError
from ..core.trace import CommEvent, CommTrace, ComputeSpan, WaitMark
from ..sim.solo import Symmetric


@dataclass(frozen=True)
class Span:
    """One stretch of one rank's time: "compute", or "comm" (a collective or one side of a transfer)."""

    rank: int
    kind: str
    start: float
    end: float
    label: str  # "compute" or the op
    scope: str
    phase: str
    blocking: bool = True  # False: an isend/irecv, async collective or overlapped TP reduction in flight meanwhile
    axis: str | None = None  # the mesh axis of the call ("tp", "cp", "dp", "dp_cp"), None outside a mesh


@dataclass(frozen=True)
class Timeline:
    """The spans of every rank, and what they add up to (seconds)."""

    spans: tuple[Span, ...]
    hardware: Cluster

    @cached_property
    def _by_rank(self) -> dict[int, list[Span]]:
        by_rank: dict[int, list[Span]] = defaultdict(list)
        for s in self.spans:
            by_rank[s.rank].append(s)
        return dict(by_rank)

    @property
    def ranks(self) -> list[int]:
        return sorted(self._by_rank)

    def of(self, rank: int, kind: str | None = None) -> list[Span]:
        return [s for s in self._by_rank.get(rank, ()) if kind in (None, s.kind)]

    def end(self, rank: int | None = None) -> float:
        """When ``rank`` (default: the last rank) finishes."""
        spans = self.spans if rank is None else self._by_rank.get(rank, ())
        return max((s.end for s in spans), default=0.0)

    def compute(self, rank: int) -> float:
        return _length(_union(self.of(rank, "compute")))

    def comm(self, rank: int) -> float:
        """Seconds during which at least one of the rank's calls or transfers is running."""
        return _length(_union(self.of(rank, "comm")))

    def hidden(self, rank: int) -> float:
        """Communication that runs while the rank computes."""
        return _overlap(_union(self.of(rank, "comm")), _union(self.of(rank, "compute")))

    def exposed(self, rank: int) -> float:
        """Communication the rank is not computing under: it waits for it."""
        return self.comm(rank) - self.hidden(rank)

    def idle(self, rank: int) -> float:
        """Neither computing nor communicating: waiting for another rank (load imbalance)."""
        return max(0.0, self.end(rank) - self.compute(rank) - self.exposed(rank))  # no negative round-off

    def bubble(self, rank: int) -> float:
        """The fraction of the whole run (until the last rank ends) this rank does not compute: a pipeline's
        bubble, (p−1)/(m+p−1) for GPipe and 1F1B with uniform stages when communication is free."""
        return 1 - self.compute(rank) / self.end() if self.end() else 0.0

    def exposed_by_axis(self, rank: int) -> dict[str | None, float]:
        """``exposed(rank)`` split by mesh axis: each instant the rank waits on communication is booked
        to the call that started first among those running then (first-seen order of axes)."""
        comm = sorted(self.of(rank, "comm"), key=lambda s: (s.start, s.end))
        compute = _union(self.of(rank, "compute"))
        cuts = sorted({t for s in comm for t in (s.start, s.end)})
        booked: dict[str | None, float] = {s.axis: 0.0 for s in comm}
        for a, b in zip(cuts, cuts[1:]):
            running = next((s for s in comm if s.start <= a and s.end >= b), None)
            if running is not None:
                booked[running.axis] += (b - a) - _overlap([(a, b)], compute)
        return booked

    def rows(self) -> list[tuple[int, float, float, float, float, float]]:
        """(rank, compute, comm hidden, comm exposed, idle, end) per rank, in seconds."""
        return [(r, self.compute(r), self.hidden(r), self.exposed(r), self.idle(r), self.end(r)) for r in self.ranks]


def timeline(trace: CommTrace | Symmetric, hw: Cluster | str, *, mfu: float = 1.0, overlap_tp: bool = False) -> Timeline:
    """Lay out every rank's recorded program on ``hw`` (see the module docstring). Needs the whole trace.

    A ``Symmetric`` (a mesh program known by a few ranks' traces: ``ts.sim.solo``) is laid out replaying only
    the ranks that the cluster tells apart: a translation of the mesh that maps every node's ranks into one
    node prices every call as before, so the ranks it maps onto each other have the same spans
    (``_QuotientReplay``). The timeline then holds those ranks only.

    ``hw``: a ``Cluster`` or a key of ``ts.cost.CLUSTERS`` (what ``ts.plan`` takes as ``cluster=``), or a
    one-link ``Hardware``. ``mfu``: the fraction of ``peak_flops`` compute runs at; ``overlap_tp``: Megatron's overlap of TP's
    backward all-gather and reduce-scatter with the matmuls beside them (module docstring)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"timeline: mfu must be in (0, 1], got {mfu}")
    c = cluster(hw)
    if isinstance(trace, Symmetric):
        return _QuotientReplay(trace.coarsened(_node_period(trace, c)), c, mfu, overlap_tp).run()
    return _Replay(trace, c, mfu, overlap_tp).run()


class _Replay:
    def __init__(self, trace: CommTrace, hw: Cluster, mfu: float, overlap_tp: bool) -> None:
        self.hw, self.flops_per_second, self.overlap_tp = hw, mfu * hw.peak_flops, overlap_tp
        self.pending: dict[int, list[tuple[tuple, CommEvent]]] = defaultdict(list)  # overlapped TP reductions
        self.unwaited: dict[int, dict[tuple, CommEvent]] = defaultdict(dict)  # async collectives not waited yet
        self.programs = trace.programs()
        self.at = {r: 0 for r in self.programs}  # index of each rank's next item
        self.clock = {r: 0.0 for r in self.programs}
        self.spans: list[Span] = []
        self.call: dict[tuple[int, int], tuple[tuple, CommEvent]] = {}  # (rank, seq) -> (its call, event)
        self.after: dict[tuple, tuple | None] = {}  # transfer -> the one before it on a link, per side
        self.arrived: dict[tuple, dict[int, float]] = defaultdict(dict)  # collective -> rank -> time
        self.posted: dict[tuple, dict[str, float]] = defaultdict(dict)  # transfer -> side -> time
        self.size: dict[tuple, CommEvent] = {}  # transfer -> its send event
        self.done: dict[tuple, tuple[float, float]] = {}  # transfer -> (start, end)
        self.both_posted: dict[tuple, None] = {}  # transfers posted on both sides, not yet timed (ordered set)
        self.seconds: dict[tuple, float] = {}  # (op, bytes, group or ends) -> its time on the cluster
        self._name_calls(trace.events)

    def _name_calls(self, events: Iterable[CommEvent]) -> None:
        """The k-th collective on a group is one call; the k-th send s->d meets the k-th recv of d from s."""
        calls_made: dict[tuple, int] = defaultdict(int)
        last_on_link: dict[tuple[int, str], tuple] = {}  # (rank, "send" | "recv") -> its latest transfer
        for e in sorted(events, key=lambda e: (e.rank, e.seq)):
            if e.op in ("send", "recv"):
                src, dst = (e.rank, e.peer) if e.op == "send" else (e.peer, e.rank)
                counter = (e.group, src, dst, e.op)
                key = self._transfer(e.group, src, dst, calls_made[counter])
                self.after[key, e.op] = last_on_link.get((e.rank, e.op))
                last_on_link[e.rank, e.op] = key
                if e.op == "send":
                    self.size[key] = e
            else:
                counter = (e.group, e.rank)
                key = ("collective", e.group, calls_made[counter])
            calls_made[counter] += 1
            self.call[e.rank, e.seq] = key, e

    def run(self) -> Timeline:
        progress = True
        while progress:
            moved = [self._advance(r) for r in self.programs]  # a list: every rank advances
            progress = any(moved) | self._start_transfers()
        stuck = {r: (self.programs[r][i] if i < len(self.programs[r]) else
                     self.pending[r][0][1] if self.pending[r] else next(iter(self.unwaited[r].values())))
                 for r, i in self.at.items() if i < len(self.programs[r]) or self.pending[r] or self.unwaited[r]}
        if stuck:
            raise SimulationError("timeline: cannot lay out the trace (is it the whole trace of one run?); "
                                  + "; ".join(f"rank {r} waits at {item}" for r, item in stuck.items()))
        for key, e in self.call.values():
            if key[0] == "transfer":
                start, end = self.done[key]
                self.spans.append(Span(e.rank, "comm", start, end, e.op, e.scope, e.phase, e.blocking, e.axis))
        return Timeline(tuple(sorted(self.spans, key=lambda s: (s.rank, s.start, s.end))), self.hw)

    def _advance(self, r: int) -> bool:
        """Run rank ``r`` as far as it can go; True if it moved."""
        moved = False
        program = self.programs[r]
        while self.at[r] < len(program):
            item = program[self.at[r]]
            if not isinstance(item, ComputeSpan) and not self._finish_overlapped(r):
                return moved
            t = self.clock[r]
            if isinstance(item, ComputeSpan):
                end = t + item.flops / self.flops_per_second
                self.spans.append(Span(r, "compute", t, end, "compute", item.scope, item.phase))
                self.clock[r], taken = end, 1
            elif isinstance(item, WaitMark):
                key, e = self.call[r, item.event_seq]
                if key[0] == "collective":  # posted with async_op=True
                    if not self._all_arrived(key, e):
                        return moved
                    del self.unwaited[r][key]
                    self.clock[r], taken = max(t, self._collective_span(r, key, e, blocking=False)), 1
                elif key not in self.done:
                    return moved
                else:
                    self.clock[r], taken = max(t, self.done[key][1]), 1
            elif item.op in ("send", "recv"):
                batch = [item]
                nxt = program[self.at[r] + 1] if self.at[r] + 1 < len(program) else None
                if isinstance(nxt, CommEvent) and nxt.batched:
                    batch.append(nxt)  # a sendrecv: both halves posted together
                keys = [self.call[r, e.seq][0] for e in batch]
                for key, e in zip(keys, batch):
                    sides = self.posted[key]
                    sides.setdefault(e.op, t)
                    if len(sides) == 2 and key not in self.done:
                        self.both_posted[key] = None
                if item.blocking:
                    if any(key not in self.done for key in keys):
                        return moved
                    self.clock[r] = max(t, *(self.done[key][1] for key in keys))
                taken = len(batch)
            else:
                key = self.call[r, item.seq][0]
                self.arrived[key].setdefault(r, t)
                if self._overlapped(item):
                    self.pending[r].append((key, item))
                    taken = 1
                elif not item.blocking:  # async_op=True: in flight until its WaitMark
                    self.unwaited[r][key] = item
                    taken = 1
                else:
                    if not self._all_arrived(key, item):
                        return moved
                    self.clock[r], taken = self._collective_span(r, key, item, blocking=True), 1
            self.at[r] += taken
            moved = True
        if self.pending[r] and self._finish_overlapped(r):
            moved = True
        if self.unwaited[r] and all(self._all_arrived(key, e) for key, e in self.unwaited[r].items()):
            for key, e in self.unwaited[r].items():  # never waited on: laid out, ending after the rank's program
                self._collective_span(r, key, e, blocking=False)
            self.unwaited[r].clear()
            moved = True
        return moved

    def _overlapped(self, e: CommEvent) -> bool:
        """A TP backward all-gather or reduce-scatter that ``overlap_tp`` runs under the compute after it."""
        return (self.overlap_tp and e.blocking and e.phase == "backward" and e.op in ("all_gather", "reduce_scatter")
                and e.axis in ("tp", None))

    def _finish_overlapped(self, r: int) -> bool:
        """Wait for rank ``r``'s overlapped reductions; False if one of them still lacks a rank."""
        for key, e in self.pending[r]:
            if not self._all_arrived(key, e):
                return False
        for key, e in self.pending[r]:
            self.clock[r] = max(self.clock[r], self._collective_span(r, key, e, blocking=False))
        self.pending[r].clear()
        return True

    def _collective_span(self, r: int, key: tuple, e: CommEvent, blocking: bool) -> float:
        """Add rank ``r``'s span of collective ``e`` (call ``key``, every rank arrived); return its end."""
        start = max(self.arrived[k][m] for k, m in self._arrivals(key, e))
        end = start + self._seconds(e)
        self.spans.append(Span(r, "comm", start, end, e.op, e.scope, e.phase, blocking, e.axis))
        return end

    def _transfer(self, group: tuple[int, ...], src: int, dst: int, k: int) -> tuple:
        """The name of the k-th transfer from ``src`` to ``dst`` on ``group``."""
        return "transfer", group, src, dst, k

    def _arrivals(self, key: tuple, e: CommEvent) -> list[tuple[tuple, int]]:
        """(call, rank) of every rank's arrival that collective ``e`` (call ``key``) waits for."""
        return [(key, m) for m in e.group]

    def _all_arrived(self, key: tuple, e: CommEvent) -> bool:
        return all(m in self.arrived[k] for k, m in self._arrivals(key, e))

    def _start_transfers(self) -> bool:
        """Time every transfer both of whose sides are posted and whose links are free; True if any."""
        started = False
        changed = True
        while changed:
            changed = False
            for key in list(self.both_posted):
                before = [self.after[key, side] for side in ("send", "recv")]
                if any(b is not None and b not in self.done for b in before):
                    continue
                start = max(*self.posted[key].values(), *(self.done[b][1] for b in before if b is not None))
                self.done[key] = (start, start + self._seconds(self.size[key]))
                del self.both_posted[key]
                changed = started = True
        return started

    def _seconds(self, e: CommEvent) -> float:
        """``event_time`` of ``e`` on its link, computed once per (op, bytes, group or ends)."""
        key = (e.op, e.nbytes, (e.rank, e.peer) if e.op in ("send", "recv") else e.group)
        if key not in self.seconds:
            self.seconds[key] = event_time(e, self.hw.link_for(e))
        return self.seconds[key]


def _node_period(symmetric: Symmetric, c: Cluster) -> tuple[int, ...]:
    """Per mesh axis, the smallest multiple of the program's period whose shift maps the ranks of each node
    into one node (then it maps groups to groups on the same kind of link, and pairs to pairs)."""
    ranks = range(symmetric.world_size)
    period = []
    for axis, (size, p) in enumerate(zip(symmetric.shape, symmetric.period)):
        for step in range(p, size + 1, p):
            if size % step:
                continue
            shift = [step if a == axis else 0 for a in range(len(symmetric.shape))]
            moves = {(c.node(r), c.node(symmetric.translate(r, shift))) for r in ranks}
            image = dict(moves)  # node -> node: one image per node, and no two nodes onto one
            if len(image) == len(moves) and len(set(image.values())) == len(image):
                period.append(step)
                break
    return tuple(period)


class _QuotientReplay(_Replay):
    """``_Replay`` of the box ranks of a ``Symmetric`` whose translations keep nodes whole (``_node_period``).

    A call names ranks outside the box: each stands for its box rank, whose matching call is the same call
    translated back. So a collective waits for every member's box rank to reach that translate, and a
    transfer is named from its sender's side: the k-th transfer from s to d is the box rank of s's k-th
    transfer to d translated back (the receiver's side, posted by the receiver's box rank, names it so too).
    """

    def __init__(self, symmetric: Symmetric, hw: Cluster, mfu: float, overlap_tp: bool) -> None:
        self.symmetric = symmetric
        self.needed: dict[tuple, list[tuple[tuple, int]]] = {}
        super().__init__(symmetric.box, hw, mfu, overlap_tp)

    def _back(self, rank: int) -> tuple[int, list[int]]:
        home, shift = self.symmetric.home(rank)
        return home, [-s for s in shift]

    def _moved_group(self, group: tuple[int, ...], shift: list[int]) -> tuple[int, ...]:
        return tuple(sorted(self.symmetric.translate(m, shift) for m in group))

    def _transfer(self, group: tuple[int, ...], src: int, dst: int, k: int) -> tuple:
        home, back = self._back(src)
        return "transfer", self._moved_group(group, back), home, self.symmetric.translate(dst, back), k

    def _arrivals(self, key: tuple, e: CommEvent) -> list[tuple[tuple, int]]:
        if key not in self.needed:
            _, group, k = key
            self.needed[key] = [(("collective", self._moved_group(group, back), k), home)
                                for home, back in map(self._back, group)]
        return self.needed[key]


def _union(spans: Iterable[Span]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for s in sorted(spans, key=lambda s: s.start):
        if merged and s.start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], s.end)
        else:
            merged.append([s.start, s.end])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum((b - a for a, b in intervals), 0.0)


def _overlap(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two sorted lists of disjoint intervals."""
    total, i, j = 0.0, 0, 0
    while i < len(xs) and j < len(ys):
        total += max(0.0, min(xs[i][1], ys[j][1]) - max(xs[i][0], ys[j][0]))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total
