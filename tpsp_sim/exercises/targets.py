"""What the puzzles of notebooks 04, 07, 08 and 10 share: each has a target to meet (a block that hides the ring,
a mesh that fits and is fastest, a memory or bytes budget), and its checker says how far from it an answer is.

They are kept apart from ``tpsp_sim.exercises.EXERCISES`` (the rank-level exercises of notebooks 00–03
and 09), and checked the same way: a stub that still raises
``NotImplementedError`` is reported with the reference solution checked instead.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Callable

from .harness import Exercise, Problem, Report, not_the_stub, unwritten_stub


def check_target(puzzles: dict[str, Exercise], name: str, fn: Callable) -> Report:
    """Check ``fn`` for puzzle ``name`` of ``puzzles`` on each of its cases; the first case that misses says how far."""
    if name not in puzzles:
        raise ValueError(f"no puzzle {name!r}; the puzzles are {sorted(puzzles)}")
    ex = puzzles[name]
    for case in ex.cases:
        try:
            problems = ex.check_case(fn, case)
        except NotImplementedError as error:
            if unwritten_stub(error):
                return Report(name, reference=check_target(puzzles, name, ex.solution))
            problems = [not_the_stub(error)]
        except Problem as error:
            problems = [str(error)]
        if problems:
            return Report(name, tuple(f"on {case} {ex.case_label}: {p}" for p in problems))
    return Report(name, checked=ex.checked)


def puzzle_set(*exercises: Exercise) -> tuple[dict[str, Exercise], Callable, Callable]:
    """(PUZZLES, check, show_solution) of a notebook's puzzles: ``check(name, fn)`` returns a Report saying how far
    from the target fn's answer is; ``show_solution(name)`` prints the reference solution."""
    puzzles = {ex.name: ex for ex in exercises}
    return puzzles, partial(check_target, puzzles), partial(print_solution, puzzles)


def print_solution(puzzles: dict[str, Exercise], name: str) -> None:
    """Print the reference solution of puzzle ``name`` of ``puzzles``."""
    if name not in puzzles:
        raise ValueError(f"no puzzle {name!r}; the puzzles are {sorted(puzzles)}")
    print("\n\n".join(inspect.getsource(obj).rstrip() for obj in puzzles[name].solution_source))
