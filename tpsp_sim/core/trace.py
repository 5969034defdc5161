"""What a run communicated: one ``CommEvent`` per rank per call, and the sums and tables built from them.

Each event carries its rank's wire bytes (``wire_bytes``: the table in ops.py). Aggregates say in
their name what they add up, the same in ``CommTrace`` and ``ts.cost.Estimate``:

    total(...)          the sum over every matching event of every rank
    per_rank(...)       {rank: the sum over that rank's matching events}
    mean_per_rank(...)  total / number of ranks: one rank's share
    max_per_rank(...)   the busiest rank's sum
    group_by(key)       {key: the sum over every event of every rank with that key}

Tables (``rows``, ``table``) show the mean per rank, so they read like one GPU's share.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Union

import torch

from .ops import recorded_ops, wire_bytes
from .table import Table

# "grad_sync": gradient reductions called after backward (``Comm.phase("grad_sync")``).
PHASES = ("forward", "backward", "grad_sync")


@dataclass(frozen=True, slots=True)
class CommEvent:
    """One rank's part in one communication call."""

    op: str
    rank: int  # global rank that made the call
    group: tuple[int, ...]  # global ranks of the group the call ran on
    shape: tuple[int, ...]  # shape of this rank's input (of the received tensor for recv)
    dtype: torch.dtype
    nbytes: int  # bytes of this rank's input
    sent_bytes: int
    recv_bytes: int
    scope: str
    phase: str  # one of PHASES
    seq: int  # position in this rank's program order (shared with WaitMark and ComputeSpan)
    peer: int | None = None  # send/recv: the global rank on the other side
    blocking: bool = True  # False for isend/irecv, whose completion is a WaitMark
    batched: bool = False  # the recv of a sendrecv: posted together with this rank's previous event (its send)
    axis: str | None = None  # the device-mesh axis of the group ("tp", "cp", "dp_cp"; mesh.py), None for plain groups


@dataclass(frozen=True, slots=True)
class WaitMark:
    """A rank waited on the handle of the asynchronous event ``event_seq``."""

    rank: int
    seq: int
    event_seq: int


@dataclass(frozen=True, slots=True)
class ComputeSpan:
    """FLOPs a rank computed between two communication records (only with ``count_flops=True``)."""

    rank: int
    seq: int
    flops: int
    scope: str
    phase: str


class Recorder:
    """One rank's log: scope stack, program order, events, waits and (optionally) FLOPs.

    A rank's world communicator and all its subgroup communicators share one recorder.
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.events: list[CommEvent] = []
        self.waits: list[WaitMark] = []
        self.compute: list[ComputeSpan] = []
        self._scopes: list[str] = []  # the open scopes' full paths, innermost last: "block0", "block0/attn"
        self._replayed: str | None = None
        self._phase: str | None = None
        self._seq = 0
        self.flop_counter: Any = None  # a tpsp_sim.core.flops.FlopCounter labelled with self.label, while counting

    @property
    def scope(self) -> str:
        if self._replayed is not None:
            return self._replayed
        return self._scopes[-1] if self._scopes else ""

    @contextmanager
    def push_scope(self, name: str) -> Iterator[None]:
        if not name or "/" in name:
            raise ValueError(f"a scope name must be non-empty and contain no '/': got {name!r}")
        self._scopes.append(f"{self._scopes[-1]}/{name}" if self._scopes else name)  # joined once, read per call
        try:
            yield
        finally:
            self._scopes.pop()

    @contextmanager
    def replay_scope(self, scope: str) -> Iterator[None]:
        """Record under ``scope`` (saved in a forward) while a backward runs."""
        previous, self._replayed = self._replayed, scope
        try:
            yield
        finally:
            self._replayed = previous

    @contextmanager
    def push_phase(self, phase: str) -> Iterator[None]:
        """Record under ``phase`` (e.g. "grad_sync" after backward) instead of the one autograd says."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; phases are {PHASES}")
        previous, self._phase = self._phase, phase
        try:
            yield
        finally:
            self._phase = previous

    def label(self) -> tuple[str, str]:
        return self.scope, self.phase()

    def phase(self) -> str:
        """The pushed phase if any, else "backward" inside an autograd backward and "forward" outside."""
        if self._phase is not None:
            return self._phase
        return "backward" if torch._C._current_graph_task_id() >= 0 else "forward"

    def _next_seq(self) -> int:
        if self.flop_counter is not None:
            for (scope, phase), flops in self.flop_counter.take():
                self.compute.append(ComputeSpan(self.rank, self._seq, flops, scope, phase))
                self._seq += 1
        self._seq += 1
        return self._seq - 1

    def record(self, op: str, x: torch.Tensor, group: tuple[int, ...], index: int, *,
               root: int = 0, peer: int | None = None, blocking: bool = True, batched: bool = False,
               axis: str | None = None) -> CommEvent:
        nbytes = x.numel() * x.element_size()
        sent, received = wire_bytes(op, nbytes, len(group), index, root)
        event = CommEvent(op=op, rank=self.rank, group=group, shape=tuple(x.shape), dtype=x.dtype,
                          nbytes=nbytes, sent_bytes=sent, recv_bytes=received, scope=self.scope,
                          phase=self.phase(), seq=self._next_seq(), peer=peer, blocking=blocking,
                          batched=batched, axis=axis)
        self.events.append(event)
        return event

    def record_wait(self, event: CommEvent) -> None:
        self.waits.append(WaitMark(self.rank, self._next_seq(), event.seq))

    def finish(self) -> None:
        """Close the log: FLOPs computed after the last communication become a final span."""
        self._next_seq()


def _matches(event: Any, filters: dict[str, Any]) -> bool:
    for name, wanted in filters.items():
        value = getattr(event, name)
        if name == "scope" and isinstance(wanted, str):
            if not (value == wanted or value.startswith(wanted + "/")):
                return False
        elif callable(wanted):
            if not wanted(value):
                return False
        elif value != wanted:
            return False
    return True


# What the aggregates add up: an event field name, or a function of the event.
Field = Union[str, Callable[[CommEvent], float]]


@dataclass
class CommTrace:
    """Everything the ranks of a run communicated, in (rank, program order).

    Filters (``filter``, ``count``, ``ops`` and the aggregates) take event fields as keywords: a value
    to equal, a predicate, or for ``scope`` a prefix (``scope="block0"`` also matches
    ``"block0/attn"``). The aggregates add up ``field``: an event field name, or a function of the
    event (``ts.cost.Estimate`` passes each call's predicted seconds).
    """

    events: list[CommEvent] = field(default_factory=list)
    waits: list[WaitMark] = field(default_factory=list)
    compute: list[ComputeSpan] = field(default_factory=list)
    world_size: int = 0  # ranks of the run (0: unknown, then the ranks that appear)

    @classmethod
    def from_recorders(cls, recorders: list[Recorder]) -> "CommTrace":
        """The trace of a run from its recorders, one per rank in rank order."""
        return cls([e for r in recorders for e in r.events], [w for r in recorders for w in r.waits],
                   [c for r in recorders for c in r.compute], len(recorders))

    def filter(self, **filters: Any) -> "CommTrace":
        """The matching events, the waits on them, and the compute spans that match every filter on a
        field a span has (rank, scope, phase, seq): a filter on the op or the bytes keeps all compute.
        A value no event could have (an unknown op or phase, a rank outside the run) is a ValueError."""
        self._check_filters(filters)
        events = [e for e in self.events if _matches(e, filters)]
        kept = {(e.rank, e.seq) for e in events}
        waits = [w for w in self.waits if (w.rank, w.event_seq) in kept]
        span_filters = {k: v for k, v in filters.items() if k in _SPAN_FIELDS}
        return CommTrace(events, waits, [c for c in self.compute if _matches(c, span_filters)], self.world_size)

    def _check_filters(self, filters: dict[str, Any]) -> None:
        """Unknown fields, and values of ``op``, ``phase`` or ``rank`` that no event of this run can have, are
        ValueErrors listing the valid ones (a typo would otherwise silently match nothing)."""
        unknown = set(filters) - _EVENT_FIELDS
        if unknown:
            raise ValueError(f"unknown CommEvent field(s) {sorted(unknown)}; fields are {sorted(_EVENT_FIELDS)}")
        valid = {"op": recorded_ops(), "phase": PHASES, "rank": tuple(self.ranks)}
        for name, choices in valid.items():
            wanted = filters.get(name)
            if name in filters and not callable(wanted) and choices and (
                    isinstance(wanted, bool) or wanted not in choices):
                shown = f"ranks {choices[0]}..{choices[-1]}" if name == "rank" else f"{name}s {choices}"
                raise ValueError(f"no event can have {name}={wanted!r}: the {shown}"
                                 + (f" (this run has {len(choices)})" if name == "rank" else ""))

    def programs(self) -> dict[int, list[CommEvent | WaitMark | ComputeSpan]]:
        """{rank: its events, waits and compute spans in program order (``seq``)}, ranks ascending."""
        items: dict[int, list[CommEvent | WaitMark | ComputeSpan]] = defaultdict(list)
        for item in (*self.compute, *self.events, *self.waits):
            items[item.rank].append(item)
        return {r: sorted(xs, key=lambda x: x.seq) for r, xs in sorted(items.items())}

    @property
    def ranks(self) -> list[int]:
        """Every rank of the run, including those that recorded nothing."""
        seen = {e.rank for e in self.events} | {w.rank for w in self.waits} | {c.rank for c in self.compute}
        return sorted(seen | set(range(self.world_size)))

    def total(self, field: Field = "sent_bytes", **filters: Any) -> float:
        """The sum of ``field`` over every matching event of every rank (the sum over ranks)."""
        get = _getter(field)
        return sum(get(e) for e in self.filter(**filters).events)

    def per_rank(self, field: Field = "sent_bytes", **filters: Any) -> dict[int, float]:
        """{rank: the sum of ``field`` over that rank's matching events}, for every rank of the run
        (0 where none match) that a ``rank`` filter keeps."""
        get = _getter(field)
        sums = {r: 0 for r in self.ranks if _matches(_Rank(r), {k: v for k, v in filters.items() if k == "rank"})}
        for e in self.filter(**filters).events:
            sums[e.rank] += get(e)
        return sums

    def mean_per_rank(self, field: Field = "sent_bytes", **filters: Any) -> float:
        """One rank's share: ``total`` divided by the number of ranks in ``per_rank`` (0.0 if none)."""
        sums = self.per_rank(field, **filters)
        return sum(sums.values()) / len(sums) if sums else 0.0

    def max_per_rank(self, field: Field = "sent_bytes", **filters: Any) -> float:
        """The busiest rank's sum of ``field``: the field's type, so an int for bytes, and int 0 when no event
        matches (``Estimate``'s seconds are always floats, 0.0 when none match)."""
        return max(self.per_rank(field, **filters).values(), default=0)

    def group_by(self, key: Callable[[CommEvent], Any] | str | tuple[str, ...],
                 field: Field = "sent_bytes") -> dict[Any, float]:
        """{key: the sum of ``field`` over every event of every rank with that key}, in first-seen order.

        ``key``: an event field name, a tuple of them (the key is then the tuple of values), or a function.
        """
        if isinstance(key, tuple):
            getters = [_getter(n) for n in key]
            key = lambda e: tuple(get(e) for get in getters)  # noqa: E731
        elif isinstance(key, str):
            key = _getter(key)
        get = _getter(field)
        sums: dict[Any, float] = {}
        for e in self.events:
            k = key(e)
            sums[k] = sums.get(k, 0) + get(e)
        return sums

    def count(self, **filters: Any) -> int:
        return len(self.filter(**filters).events)

    def ops(self, **filters: Any) -> dict[str, int]:
        """How many calls of each op match ``filters`` (counting every rank's event)."""
        counts: dict[str, int] = defaultdict(int)
        for e in self.filter(**filters).events:
            counts[e.op] += 1
        return dict(counts)

    def rows(self) -> list[tuple[str, str, str, int, int, int]]:
        """(scope, phase, op, calls per rank, bytes sent per rank, bytes received per rank), in order of first call.

        "Per rank" is the mean over the ranks of the run (rounded down), so the numbers read like one GPU's share.
        """
        table: dict[tuple[str, str, str], list[int]] = {}
        for e in self.events:
            row = table.setdefault((e.scope, e.phase, e.op), [0, 0, 0])
            row[0] += 1
            row[1] += e.sent_bytes
            row[2] += e.recv_bytes
        n = len(self.ranks) or 1
        return [(s, p, o, c // n, sb // n, rb // n) for (s, p, o), (c, sb, rb) in table.items()]

    def table(self, fmt: str = "text") -> str:
        """Calls and bytes per rank for each (scope, phase, op), and their total: "text", "markdown" or "html"."""
        rows = self.rows()
        body = [(s or "-", p, o, str(c), format_bytes(sb), format_bytes(rb)) for s, p, o, c, sb, rb in rows]
        total = ("total", "", "", str(sum(r[3] for r in rows)), format_bytes(sum(r[4] for r in rows)),
                 format_bytes(sum(r[5] for r in rows)))
        return Table(("scope", "phase", "op", "calls/rank", "sent/rank", "recv/rank"), body,
                     frozenset({"calls/rank", "sent/rank", "recv/rank"}), [total]).render(fmt)

    def __str__(self) -> str:
        return self.table()

    def __len__(self) -> int:
        return len(self.events)

    def _repr_html_(self) -> str:
        return self.table("html")


@dataclass(frozen=True)
class _Rank:
    """Stands in for an event when a ``rank`` filter picks the ranks of ``per_rank``."""

    rank: int


_EVENT_FIELDS = {f.name for f in fields(CommEvent)}
_SPAN_FIELDS = {f.name for f in fields(ComputeSpan)} & _EVENT_FIELDS


def _getter(field: Field) -> Callable[[Any], Any]:
    if callable(field):
        return field
    if field not in _EVENT_FIELDS:
        raise ValueError(f"unknown CommEvent field {field!r}; fields are {sorted(_EVENT_FIELDS)}")
    return lambda e: getattr(e, field)


def format_bytes(n: float) -> str:
    """Human-readable bytes: 0 B, 512 B, 1.5 KiB, 3.0 MiB, 2.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
