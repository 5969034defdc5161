"""The schedules by name, and their closed forms as pure functions (what a planner calls): the bubble, the
micro-batches in flight on stage 0, and the bytes each rank sends on the pipeline axis.

Adding a schedule: one module defining a ``PipelineSchedule`` subclass (its ``make_program``,
``bubble_fraction`` and ``in_flight``), and one line here.
"""

from __future__ import annotations

from .gpipe import ScheduleGPipe
from .interleaved import ScheduleInterleaved1F1B
from .one_f_one_b import Schedule1F1B
from .schedule import HEADER, PipelineSchedule
from .zbh1 import ScheduleZBH1

SCHEDULES: dict[str, type[PipelineSchedule]] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zbh1": ScheduleZBH1,
}


def schedule_class(name: str) -> type[PipelineSchedule]:
    """The schedule called ``name`` (a key of ``SCHEDULES``)."""
    if name not in SCHEDULES:
        raise ValueError(f"pipeline: unknown schedule {name!r}, expected one of {tuple(SCHEDULES)}")
    return SCHEDULES[name]


def bubble_fraction(schedule: str, p: int, m: int, v: int = 1) -> float:
    """The fraction of a step each rank idles, uniform stages: (p−1)/(m+p−1) for "gpipe" and "1f1b",
    (p−1)/(v·m+p−1) for "interleaved_1f1b", (p−1)(F+B−W) / (m(F+B+W) + (p−1)(F+B−W)) for "zbh1"
    with F = B = W (Qi et al.; m ≥ p; true for any W ≤ min(F, B)). Measured on the timeline in tests/test_pipeline_bubble.py."""
    _check(schedule, p, m, v)
    return schedule_class(schedule).bubble_fraction(p, m, v)


def in_flight(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Stage 0's peak of micro-batches whose activations are kept, in whole-stage micro-batches: m for
    "gpipe", min(p, m) for "1f1b" and "zbh1", p·(1 + (p−1)/(p·v)) for "interleaved_1f1b" when p divides m
    (Megatron's accounting). Measured with the saved-tensor meter in tests/test_pipeline_memory.py."""
    _check(schedule, p, m, v)
    return schedule_class(schedule).in_flight(p, m, v)


def _check(schedule: str, p: int, m: int, v: int) -> None:
    if min(p, m, v) < 1 or (v > 1 and not schedule_class(schedule).multi_stage):
        raise ValueError(f"pipeline: {schedule!r} needs p, m >= 1 and v = 1 unless interleaved; got p={p}, m={m}, v={v}")


def sent_bytes(p: int, m: int, v: int, activation_bytes: int) -> list[int]:
    """Bytes each rank sends on the pipeline axis in one step, any schedule: an activation forward from every
    stage but the last and a gradient backward from every stage but the first, per micro-batch, plus one
    80-byte shape header per forward boundary (rank r holds v stages; the last is on rank p−1, the first on 0)."""
    header = HEADER * 8  # the shape header: HEADER int64s
    return [(v - (r == p - 1)) * (m * activation_bytes + header) + (v - (r == 0)) * m * activation_bytes
            for r in range(p)]
