"""DDP's second stream: when each gradient bucket's reduction runs, and how much of it backward cannot hide.

``ts.timeline`` replays every collective as a blocking call, so it charges DDP's bucket reductions in
full. PyTorch's DDP launches each bucket on a separate communication stream the moment its last
gradient is ready and goes on with backward; the buckets run one after another on that stream, and
only what is still running when backward's compute ends is exposed. ``grad_sync_overlap`` replays one
rank's recorded program (``ts.run(..., count_flops=True)``) that way:

* compute spans take flops / ``flops_per_second``; other calls (tensor or context parallelism) block
  for ``seconds(event)``;
* bucket k (an event with phase "grad_sync") is launched at the rank's clock when it is recorded and
  starts at max(launch, end of bucket k−1); it ends ``seconds(event)`` later;
* its exposed time is the part of [start, end] after both the compute and bucket k−1 have ended, so the
  exposed times add up to max(0, end of the last bucket − end of compute).

``seconds`` prices one call, e.g. ``lambda e: ts.cost.event_time(e, hw)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..core.trace import CommEvent, CommTrace, ComputeSpan


@dataclass(frozen=True)
class BucketTime:
    """One bucket's reduction on the communication stream (seconds from the start of the rank's program)."""

    scope: str
    launched: float
    start: float
    end: float
    exposed: float


def grad_sync_overlap(trace: CommTrace, rank: int, *, flops_per_second: float,
                      seconds: Callable[[CommEvent], float]) -> tuple[list[BucketTime], float]:
    """(every bucket's times, the end of the rank's compute) with buckets on their own stream (module docstring)."""
    if not flops_per_second > 0:
        raise ValueError(f"flops_per_second must be positive, got {flops_per_second}")
    programs = trace.programs()
    if rank not in programs:
        raise ValueError(f"rank {rank} recorded nothing in this trace (ranks {sorted(programs)})")
    clock, stream_free, launched = 0.0, 0.0, []
    for item in programs[rank]:
        if isinstance(item, ComputeSpan):
            clock += item.flops / flops_per_second
        elif isinstance(item, CommEvent) and item.phase == "grad_sync":
            start = max(clock, stream_free)
            stream_free = start + seconds(item)
            launched.append((item.scope, clock, start, stream_free))
        elif isinstance(item, CommEvent):
            clock += seconds(item)
    buckets, covered = [], clock  # time until which the rank is busy anyway (compute, or an earlier bucket)
    for scope, at, start, end in launched:
        exposed = max(0.0, end - max(start, covered))
        covered = max(covered, end)
        buckets.append(BucketTime(scope, at, start, end, exposed))
    return buckets, clock
