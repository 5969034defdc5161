"""Data parallelism's side streams: how much of DDP's bucket reductions and FSDP's all-gathers compute hides.

``ts.timeline`` replays every collective as a blocking call, so it charges these in full. PyTorch runs
them on their own CUDA streams; the functions here replay one rank's recorded program
(``ts.run(..., count_flops=True)``) that way. Compute spans take flops / ``flops_per_second``; any call
not named below blocks the rank for ``seconds(event)`` (e.g. ``lambda e: ts.cost.event_time(e, hw)``).

``grad_sync_overlap`` — DDP (and ZeRO-1/2) buckets: each call with phase "grad_sync" is launched on a
reduction stream at the rank's clock when it is recorded and starts at max(launch, end of the previous
one); the rank does not wait for it. Its exposed time is the part of it after both the compute and the
previous call have ended, so the exposed times add up to max(0, end of the last − end of the compute).

``fsdp_prefetch_overlap`` — FSDP's all-gathers (scope "fsdp/...") on an all-gather stream, its
reduce-scatters on the reduction stream as above. Without prefetch an all-gather is issued where it
was recorded, just before the module that needs it, and the rank waits for all of it; with
``prefetch=True`` the next one of the same phase is issued as soon as the rank has the current one
(FSDP2's prefetch: block k+1's all-gather runs under block k's compute in forward, block k−1's under
block k's in backward; the first of backward is not fetched during forward), and the rank waits only
for what is left. An all-gather's exposed time is the rank's wait for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..core.trace import CommEvent, CommTrace, ComputeSpan


@dataclass(frozen=True)
class StreamCall:
    """One call on a side stream (seconds from the start of the rank's program)."""

    scope: str
    op: str
    launched: float
    start: float
    end: float
    exposed: float


Seconds = Callable[[CommEvent], float]


def _program(trace: CommTrace, rank: int, flops_per_second: float) -> list:
    if not flops_per_second > 0:
        raise ValueError(f"flops_per_second must be positive, got {flops_per_second}")
    programs = trace.programs()
    if rank not in programs:
        raise ValueError(f"rank {rank} recorded nothing in this trace (ranks {sorted(programs)})")
    return programs[rank]


class _ReductionStream:
    """Calls launched without waiting, run one after another; exposed: what runs after the rank is done."""

    def __init__(self) -> None:
        self.free, self.calls = 0.0, []

    def launch(self, e: CommEvent, at: float, seconds: Seconds) -> None:
        start = max(at, self.free)
        self.free = start + seconds(e)
        self.calls.append((e, at, start, self.free))

    def finish(self, busy_until: float) -> list[StreamCall]:
        out, covered = [], busy_until
        for e, at, start, end in self.calls:
            out.append(StreamCall(e.scope, e.op, at, start, end, max(0.0, end - max(start, covered))))
            covered = max(covered, end)
        return out


def grad_sync_overlap(trace: CommTrace, rank: int, *, flops_per_second: float,
                      seconds: Seconds) -> tuple[list[StreamCall], float]:
    """(every "grad_sync" call on the reduction stream, the end of the rank's compute) (module docstring)."""
    clock, stream = 0.0, _ReductionStream()
    for item in _program(trace, rank, flops_per_second):
        if isinstance(item, ComputeSpan):
            clock += item.flops / flops_per_second
        elif isinstance(item, CommEvent) and item.phase == "grad_sync":
            stream.launch(item, clock, seconds)
        elif isinstance(item, CommEvent):
            clock += seconds(item)
    return stream.finish(clock), clock


def fsdp_prefetch_overlap(trace: CommTrace, rank: int, *, flops_per_second: float, seconds: Seconds,
                          prefetch: bool = True) -> tuple[list[StreamCall], float]:
    """(every FSDP all-gather and reduce-scatter on its stream, when the rank is done) (module docstring)."""
    program = _program(trace, rank, flops_per_second)
    gathers = [e for e in program if isinstance(e, CommEvent) and e.op == "all_gather" and e.scope.startswith("fsdp/")]
    position = {e.seq: k for k, e in enumerate(gathers)}
    issued: dict[int, tuple[float, float, float]] = {}  # k -> (launched, start, end)
    gather_free, clock, reductions, waits = 0.0, 0.0, _ReductionStream(), []

    def issue(k: int, at: float) -> None:
        nonlocal gather_free
        start = max(at, gather_free)
        gather_free = start + seconds(gathers[k])
        issued[k] = (at, start, gather_free)

    for item in program:
        if isinstance(item, ComputeSpan):
            clock += item.flops / flops_per_second
        elif not isinstance(item, CommEvent):  # a WaitMark: its call's time was counted where it was posted
            continue
        elif item.seq in position:
            k = position[item.seq]
            if k not in issued:
                issue(k, clock)
            launched, start, end = issued[k]
            waits.append(StreamCall(item.scope, item.op, launched, start, end, max(0.0, end - clock)))
            clock = max(clock, end)
            if prefetch and k + 1 < len(gathers) and k + 1 not in issued and gathers[k + 1].phase == item.phase:
                issue(k + 1, clock)
        elif item.phase == "grad_sync":
            reductions.launch(item, clock, seconds)
        else:
            clock += seconds(item)
    calls = sorted(waits + reductions.finish(clock), key=lambda c: c.launched)
    return calls, max([clock] + [c.end for c in calls])
