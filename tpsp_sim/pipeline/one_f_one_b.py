"""1F1B (PipeDream-Flush, Narayanan et al. 2021 §2.2): after p−1−rank warm-up forwards, one forward then one backward.

Same bubble as GPipe, (p−1)/(m+p−1), but stage 0 holds at most p micro-batches' activations, not m.
"""

from __future__ import annotations

from .actions import Action, Program
from .schedule import PipelineSchedule


def one_f_one_b(rank: int, p: int, m: int, backward: str = "B") -> list[Action]:
    """Rank ``rank``'s 1F1B order: warm-up forwards, then pairs (F k+w, ``backward`` k), then the last backwards."""
    warmup = min(p - 1 - rank, m)
    steady = [a for k in range(m - warmup) for a in (Action("F", k + warmup), Action(backward, k))]
    return ([Action("F", k) for k in range(warmup)] + steady
            + [Action(backward, k) for k in range(m - warmup, m)])


class Schedule1F1B(PipelineSchedule):
    """One forward, one backward (torch.distributed.pipelining.Schedule1F1B)."""

    @staticmethod
    def make_program(p: int, m: int, v: int = 1) -> Program:
        return {r: one_f_one_b(r, p, m) for r in range(p)}

    @staticmethod
    def bubble_fraction(p: int, m: int, v: int = 1) -> float:
        return (p - 1) / (m + p - 1)

    @staticmethod
    def in_flight(p: int, m: int, v: int = 1) -> float:
        return min(p, m)
