"""Exercises of notebook 09: a stage's 1F1B program, and the micro-batch count that makes the bubble small.

Both are checked on the program's dry run (``ts.pipeline.dry_run``: F takes 1 unit, a backward 2), so
a wrong program is reported as the deadlock or the error the runtime would raise, with its ranks and
actions named, before any tensor moves.
"""

from __future__ import annotations

from typing import Callable

from ..core.errors import DeadlockError
from ..pipeline.actions import Action, parse_program
from ..pipeline.dry_run import bubble, dry_run
from ..pipeline.one_f_one_b import Schedule1F1B, one_f_one_b
from .harness import WORLD_SIZES, Exercise

COSTS = {"F": 1.0, "B": 1.0, "W": 1.0}  # a whole backward (B without W) takes B + W = 2 units


def microbatches_for_bubble(p: int, target: float) -> int:
    """The fewest micro-batches m for which 1F1B's bubble (p-1)/(m+p-1) is below ``target``."""
    m = 1
    while (p - 1) / (m + p - 1) >= target:
        m += 1
    return m


def in_flight(actions: list[Action]) -> int:
    """The most micro-batches between their F and their B on one rank."""
    live = peak = 0
    for a in actions:
        live += {"F": 1, "B": -1}.get(a.kind, 0)
        peak = max(peak, live)
    return peak


def _program_case(fn: Callable, p: int) -> list[str]:
    for m in (1, p, 2 * p + 1):
        try:
            program = parse_program({r: fn(r, p, m) for r in range(p)})
            slots = dry_run(program, p, 1, m, COSTS)
        except NotImplementedError:
            raise
        except (ValueError, DeadlockError) as error:
            return [f"m={m}: {type(error).__name__}: {error}"]
        for r, actions in program.items():
            if in_flight(actions) > min(p - r, m):
                return [f"m={m}: rank {r} keeps {in_flight(actions)} micro-batches in flight (between F and B), "
                        f"1F1B keeps at most min(p - rank, m) = {min(p - r, m)}: start the backwards sooner"]
        measured, want = max(bubble(slots).values()), (p - 1) / (m + p - 1)
        if abs(measured - want) > 1e-12:
            return [f"m={m}: bubble {measured:.4f} of the step, 1F1B's is (p-1)/(m+p-1) = {want:.4f}: "
                    f"a rank waits longer than it needs to"]
    return []


def _bubble_case(fn: Callable, p: int) -> list[str]:
    target = 0.1
    got = fn(p, target)
    if not isinstance(got, int) or got < 1:
        return [f"returned {got!r}, not a positive int"]

    def measured(m: int) -> float:
        return max(bubble(dry_run(Schedule1F1B.make_program(p, m), p, 1, m, COSTS)).values())

    if measured(got) >= target - 1e-12:  # "below": by more than the dry run's round-off
        return [f"m={got} leaves a bubble of {measured(got):.4f} (measured on the dry run), not below {target}"]
    if got > 1 and measured(got - 1) < target - 1e-12:
        return [f"m={got - 1} already brings the bubble to {measured(got - 1):.4f} < {target}: fewer will do"]
    return []


ONE_F_ONE_B_PROGRAM = Exercise(
    name="one_f_one_b_program", notebook="09_pipeline_parallelism",
    task="one_f_one_b_program(rank, p, m) -> list of actions (Action or text like 'F0', 'B0'): rank's 1F1B order",
    cases=WORLD_SIZES, case_label="ranks", check_case=_program_case,
    checked="with m = 1, p and 2p+1 micro-batches the programs run without deadlock, keep at most min(p - rank, m) "
            "micro-batches in flight and idle (p-1)/(m+p-1) of the step, on 2, 3 and 4 ranks.",
    solution=one_f_one_b, solution_source=(one_f_one_b,))

MICROBATCHES_FOR_BUBBLE = Exercise(
    name="microbatches_for_bubble", notebook="09_pipeline_parallelism",
    task="microbatches_for_bubble(p, target) -> the fewest micro-batches m that bring 1F1B's bubble below target",
    cases=(2, 3, 4, 8), case_label="ranks", check_case=_bubble_case,
    checked="the dry-run bubble with m micro-batches is below 10% and with m - 1 it is not, on 2, 3, 4 and 8 ranks.",
    solution=microbatches_for_bubble, solution_source=(microbatches_for_bubble,))
