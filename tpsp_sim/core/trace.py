"""What a run communicated: one ``CommEvent`` per rank per call, and the tables built from them.

Wire bytes follow the nccl-tests convention for ring algorithms on p ranks (design section 4):

    op              input per rank     sent = received per rank
    all_gather      shard of n bytes   (p-1)·n
    reduce_scatter  N bytes            (p-1)/p·N
    all_reduce      N bytes            2(p-1)/p·N
    all_to_all      N bytes            (p-1)/p·N
    broadcast       N bytes            pipelined ring: the root sends N, the last rank receives N,
                                       every other rank does both
    send / recv     n bytes            the sender sends n, the receiver receives n
"""

from __future__ import annotations

import html
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator

import torch

PHASES = ("forward", "backward")


@dataclass(frozen=True)
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
    phase: str  # "forward" or "backward"
    seq: int  # position in this rank's program order (shared with WaitMark and ComputeSpan)
    peer: int | None = None  # send/recv: the global rank on the other side
    blocking: bool = True  # False for isend/irecv, whose completion is a WaitMark
    batched: bool = False  # the recv of a sendrecv: posted together with this rank's previous event (its send)
    axis: str | None = None  # the device-mesh axis of the group ("tp", "cp", "dp_cp"; mesh.py), None for plain groups


@dataclass(frozen=True)
class WaitMark:
    """A rank waited on the handle of the asynchronous event ``event_seq``."""

    rank: int
    seq: int
    event_seq: int


@dataclass(frozen=True)
class ComputeSpan:
    """FLOPs a rank computed between two communication records (only with ``count_flops=True``)."""

    rank: int
    seq: int
    flops: int
    scope: str
    phase: str


def wire_bytes(op: str, nbytes: int, world_size: int, index: int = 0, root: int = 0) -> tuple[int, int]:
    """(sent, received) bytes of one rank for ``op`` on ``world_size`` ranks; ``nbytes`` is its input.

    ``index`` is the rank's position in the group and ``root`` the broadcast source (group ranks).
    Fractions are rounded down to whole bytes.
    """
    p = world_size
    if op == "all_gather":
        moved = (p - 1) * nbytes
    elif op in ("reduce_scatter", "all_to_all"):
        moved = (p - 1) * nbytes // p
    elif op == "all_reduce":
        moved = 2 * (p - 1) * nbytes // p
    elif op == "broadcast":
        if p == 1:
            return 0, 0
        position = (index - root) % p
        return (0 if position == p - 1 else nbytes), (0 if position == 0 else nbytes)
    elif op == "send":
        return nbytes, 0
    elif op == "recv":
        return 0, nbytes
    elif op == "barrier":
        moved = 0
    else:
        raise ValueError(f"unknown communication op {op!r}")
    return moved, moved


class Recorder:
    """One rank's log: scope stack, program order, events, waits and (optionally) FLOPs.

    A rank's world communicator and all its subgroup communicators share one recorder.
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.events: list[CommEvent] = []
        self.waits: list[WaitMark] = []
        self.compute: list[ComputeSpan] = []
        self._scopes: list[str] = []
        self._replayed: str | None = None
        self._seq = 0
        self.flop_counter: Any = None  # a tpsp_sim.flops.FlopCounter labelled with self.label, while counting

    @property
    def scope(self) -> str:
        if self._replayed is not None:
            return self._replayed
        return "/".join(self._scopes)

    @contextmanager
    def push_scope(self, name: str) -> Iterator[None]:
        if not name or "/" in name:
            raise ValueError(f"a scope name must be non-empty and contain no '/': got {name!r}")
        self._scopes.append(name)
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

    def label(self) -> tuple[str, str]:
        return self.scope, self.phase()

    @staticmethod
    def phase() -> str:
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


@dataclass
class CommTrace:
    """Everything the ranks of a run communicated, in (rank, program order).

    Filters (``total``, ``filter``, ``count``) take event fields as keywords: a value to equal, a
    predicate, or for ``scope`` a prefix (``scope="block0"`` also matches ``"block0/attn"``).
    """

    events: list[CommEvent] = field(default_factory=list)
    waits: list[WaitMark] = field(default_factory=list)
    compute: list[ComputeSpan] = field(default_factory=list)

    @classmethod
    def from_recorders(cls, recorders: list[Recorder]) -> "CommTrace":
        return cls([e for r in recorders for e in r.events], [w for r in recorders for w in r.waits],
                   [c for r in recorders for c in r.compute])

    def filter(self, **filters: Any) -> "CommTrace":
        _check_fields(filters)
        events = [e for e in self.events if _matches(e, filters)]
        kept = {(e.rank, e.seq) for e in events}
        waits = [w for w in self.waits if (w.rank, w.event_seq) in kept]
        rank_filter = {k: v for k, v in filters.items() if k == "rank"}
        return CommTrace(events, waits, [c for c in self.compute if _matches(c, rank_filter)])

    def total(self, field: str = "sent_bytes", **filters: Any) -> int:
        """Sum of ``field`` over the events that match ``filters``."""
        return sum(getattr(e, field) for e in self.filter(**filters).events)

    def count(self, **filters: Any) -> int:
        return len(self.filter(**filters).events)

    def ops(self, **filters: Any) -> dict[str, int]:
        """How many calls of each op match ``filters`` (counting every rank's event)."""
        counts: dict[str, int] = defaultdict(int)
        for e in self.filter(**filters).events:
            counts[e.op] += 1
        return dict(counts)

    def group_by(self, key: Callable[[CommEvent], Any] | str, field: str = "sent_bytes") -> dict[Any, int]:
        """Totals of ``field`` per value of ``key`` (an event field name or a function), in first-seen order."""
        get = (lambda e: getattr(e, key)) if isinstance(key, str) else key
        totals: dict[Any, int] = {}
        for e in self.events:
            k = get(e)
            totals[k] = totals.get(k, 0) + getattr(e, field)
        return totals

    def rows(self) -> list[tuple[str, str, str, int, int, int]]:
        """(scope, phase, op, calls per rank, bytes sent per rank, bytes received per rank), in order of first call.

        "Per rank" is the mean over the ranks of the run, so the numbers read like one GPU's share.
        """
        ranks = {e.rank for e in self.events} or {0}
        table: dict[tuple[str, str, str], list[int]] = {}
        for e in self.events:
            row = table.setdefault((e.scope, e.phase, e.op), [0, 0, 0])
            row[0] += 1
            row[1] += e.sent_bytes
            row[2] += e.recv_bytes
        n = len(ranks)
        return [(s, p, o, c // n, sb // n, rb // n) for (s, p, o), (c, sb, rb) in table.items()]

    def table(self) -> str:
        header = ("scope", "phase", "op", "calls/rank", "sent/rank", "recv/rank")
        rows = self.rows()
        body = [(s or "-", p, o, str(c), format_bytes(sb), format_bytes(rb)) for s, p, o, c, sb, rb in rows]
        body.append(("total", "", "", str(sum(r[3] for r in rows)),
                     format_bytes(sum(r[4] for r in rows)), format_bytes(sum(r[5] for r in rows))))
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                 for row in [header, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __len__(self) -> int:
        return len(self.events)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in ("scope", "phase", "op", "calls/rank", "sent/rank", "recv/rank"))
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (s or "-", p, o, c, format_bytes(sb), format_bytes(rb)))
            + "</tr>" for s, p, o, c, sb, rb in self.rows())
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _check_fields(filters: dict[str, Any]) -> None:
    known = {f.name for f in fields(CommEvent)}
    unknown = set(filters) - known
    if unknown:
        raise ValueError(f"unknown CommEvent field(s) {sorted(unknown)}; fields are {sorted(known)}")


def format_bytes(n: float) -> str:
    """Human-readable bytes: 0 B, 512 B, 1.5 KiB, 3.0 MiB, 2.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
