"""Interleaved 1F1B (Narayanan et al. 2021 §2.2, Megatron-LM's virtual pipeline): v chunks per rank.

Rank r holds stages r, r+p, …, r+(v−1)p. Forwards walk through the chunks in rounds of g
micro-batches (g = p when p divides m; torch's rule otherwise: m split into max(1, m // p) equal
rounds), chunk 0 first; backwards walk the chunks the other way. Warm-up (Megatron):
2(p−1−r) + (v−1)g forwards. Each stage is 1/v as long, so the bubble shrinks to (p−1)/(v·m+p−1);
stage 0 keeps (v−1)g + 2(p−1) + 1 chunk-micro-batches, i.e. p·(1 + (p−1)/(p·v)) stage-micro-batches
when g = p (Megatron's accounting).
"""

from __future__ import annotations

from .actions import Action, Program
from .schedule import PipelineSchedule


def round_size(p: int, m: int) -> int:
    """The micro-batches of one round, g; ValueError when m < p or m does not split into equal rounds."""
    if m < p:
        raise ValueError(f"ScheduleInterleaved1F1B: n_microbatches={m} must be at least the pipeline's {p} ranks")
    rounds = m // p
    if m % rounds:
        raise ValueError(f"ScheduleInterleaved1F1B: n_microbatches={m} must split into m // p = {rounds} equal "
                         f"rounds (torch's rule; Megatron's: a multiple of p={p})")
    return m // rounds


def interleaved(rank: int, p: int, m: int, v: int) -> list[Action]:
    """Rank ``rank``'s order: warm-up forwards, then one forward / one backward, then the last backwards."""
    g = round_size(p, m)

    def op(k: int, kind: str) -> Action:
        chunk = (k // g) % v
        return Action(kind, (k // (g * v)) * g + k % g, chunk if kind == "F" else v - 1 - chunk)

    total = v * m
    warmup = min(2 * (p - 1 - rank) + (v - 1) * g, total)
    steady = [a for k in range(total - warmup) for a in (op(k + warmup, "F"), op(k, "B"))]
    return [op(k, "F") for k in range(warmup)] + steady + [op(k, "B") for k in range(total - warmup, total)]


class ScheduleInterleaved1F1B(PipelineSchedule):
    """Several stages per rank (torch.distributed.pipelining.ScheduleInterleaved1F1B)."""

    multi_stage = True

    @staticmethod
    def make_program(p: int, m: int, v: int = 1) -> Program:
        return {r: interleaved(r, p, m, v) for r in range(p)}

    @staticmethod
    def bubble_fraction(p: int, m: int, v: int = 1) -> float:
        return (p - 1) / (v * m + p - 1)

    @staticmethod
    def in_flight(p: int, m: int, v: int = 1) -> float:
        """Stage 0's peak, in micro-batches of a whole stage (v chunks): p·(1 + (p−1)/(p·v)) when p divides m."""
        return min((v - 1) * round_size(p, m) + 2 * (p - 1) + 1, v * m) / v
