"""Exercises with automatic checking, posed in notebooks 00–03 and 09.

    from tpsp_sim.exercises import check, show_solution
    check("g_bar", my_g_bar)      # ✓, or what is wrong: output vs dense (and the mistake, when it is a
                                  # known one), wrong collective, bytes, deadlock
    show_solution("g_bar")        # prints a reference solution

Each checker runs the learner's function on virtual ranks (2, 3 and 4 of them) in float64 and
compares it with the dense answer and the closed-form byte counts. A stub that still raises
``NotImplementedError`` is reported as not written yet, with the reference solution checked the
same way, so a notebook runs top to bottom before the learner writes anything.
"""

from __future__ import annotations

from typing import Callable

from .attention import ONLINE_SOFTMAX_MERGE, RING_ATTENTION_FORWARD
from .collectives import RING_ALL_GATHER, RING_REDUCE_SCATTER
from .harness import Exercise, Report, check_exercise, find, print_solution
from .mappings import F, F_BAR, G, G_BAR
from .pipeline import MICROBATCHES_FOR_BUBBLE, ONE_F_ONE_B_PROGRAM

EXERCISES: dict[str, Exercise] = {ex.name: ex for ex in (RING_ALL_GATHER, RING_REDUCE_SCATTER, F, F_BAR, G, G_BAR,
                                                         ONLINE_SOFTMAX_MERGE, RING_ATTENTION_FORWARD,
                                                         ONE_F_ONE_B_PROGRAM, MICROBATCHES_FOR_BUBBLE)}


def exercise(name: str) -> Exercise:
    return find(EXERCISES, name)


def check(name: str, fn: Callable) -> Report:
    """Check the learner's ``fn`` for exercise ``name``: a ``Report`` (``.ok``, ``.problems``; prints as text)."""
    return check_exercise(EXERCISES, name, fn)


def solution(name: str) -> Callable:
    """The reference solution of exercise ``name`` (a function with the exercise's signature)."""
    return exercise(name).solution


def show_solution(name: str) -> None:
    """Print the source of the reference solution of exercise ``name``."""
    print_solution(EXERCISES, name)


__all__ = ["EXERCISES", "Exercise", "Report", "check", "exercise", "show_solution", "solution"]
