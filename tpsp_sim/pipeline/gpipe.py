"""GPipe (Huang et al. 2019): every micro-batch forward, then every micro-batch backward.

Bubble (p−1)/(m+p−1) for uniform stages; stage 0 keeps all m micro-batches' activations until its
first backward.
"""

from __future__ import annotations

from .actions import Action, Program
from .schedule import PipelineSchedule


class ScheduleGPipe(PipelineSchedule):
    """All forwards, then all backwards (torch.distributed.pipelining.ScheduleGPipe)."""

    @staticmethod
    def make_program(p: int, m: int, v: int = 1) -> Program:
        return {r: [Action("F", k) for k in range(m)] + [Action("B", k) for k in range(m)] for r in range(p)}

    @staticmethod
    def bubble_fraction(p: int, m: int, v: int = 1) -> float:
        return (p - 1) / (m + p - 1)

    @staticmethod
    def in_flight(p: int, m: int, v: int = 1) -> float:
        return m
