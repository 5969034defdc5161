"""ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", §3.1): 1F1B with the backward split into B and W.

B (input gradient) stays where 1F1B has its backward, so the next stage down gets its gradient as
early as before; rank r holds back its first r weight gradients W and runs them in the cool-down,
where 1F1B idles. The idle time per rank shrinks from 1F1B's (p−1)(F+B+W) to (p−1)(F+B−W) — a third
when F = B = W — for m ≥ p and W ≤ min(F, B) (dry-run over random times in the tests; a larger W
does not fit the holes); the activations in flight stay 1F1B's p on every stage (a micro-batch's
activations live until its W).
"""

from __future__ import annotations

from .actions import Action, Program
from .one_f_one_b import one_f_one_b
from .schedule import PipelineSchedule


def zbh1(rank: int, p: int, m: int) -> list[Action]:
    """1F1B's order with B the input gradient; W k follows B k+rank (the rest at the end)."""
    program, done = [], 0
    for a in one_f_one_b(rank, p, m):
        program.append(a)
        if a.kind == "B" and a.microbatch >= rank:
            program.append(Action("W", done))
            done += 1
    return program + [Action("W", k) for k in range(done, m)]


class ScheduleZBH1(PipelineSchedule):
    """Zero bubble, H1 (the 1F1B memory budget)."""

    @staticmethod
    def make_program(p: int, m: int, v: int = 1) -> Program:
        return {r: zbh1(r, p, m) for r in range(p)}

    @staticmethod
    def bubble_fraction(p: int, m: int, v: int = 1, f: float = 1.0, b: float = 1.0, w: float = 1.0) -> float:
        idle = (p - 1) * (f + b - w)
        return idle / (m * (f + b + w) + idle)

    @staticmethod
    def in_flight(p: int, m: int, v: int = 1) -> float:
        return min(p, m)
