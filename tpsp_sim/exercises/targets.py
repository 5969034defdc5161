"""What the puzzles of notebooks 04, 07, 08 and 10 share: each has a target to meet (a block that hides the ring,
a mesh that fits and is fastest, a memory or bytes budget), and its checker says how far from it an answer is.

They are kept apart from ``tpsp_sim.exercises.EXERCISES`` (the rank-level exercises of notebooks 00–03
and 09), and checked the same way: a stub that still raises
``NotImplementedError`` is reported with the reference solution checked instead.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from .harness import Exercise, check_exercise, print_solution


def puzzle_set(*exercises: Exercise) -> tuple[dict[str, Exercise], Callable, Callable]:
    """(PUZZLES, check, show_solution) of a notebook's puzzles: ``check(name, fn)`` returns a Report saying how far
    from the target fn's answer is; ``show_solution(name)`` prints the reference solution (harness.py's, as for
    the exercises)."""
    puzzles = {ex.name: ex for ex in exercises}
    return puzzles, partial(check_exercise, puzzles, noun="puzzle"), partial(print_solution, puzzles, noun="puzzle")
