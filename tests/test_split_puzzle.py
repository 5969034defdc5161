"""Notebook 08's puzzle (issue 22 §3): beat the planner's second-best split. The planner's best and second-best
pass, its third-best and slower splits are told how far they are from the target, a split that does not fit
is told by how much, and malformed answers are named."""

from __future__ import annotations

import pytest

from tpsp_sim.exercises import split

NAME = "beat_the_second_best"


def stub(*args):
    raise NotImplementedError


def as_answer(p) -> dict:
    return {"pp": p.pp, "dp": p.dp, "cp": p.cp, "tp": p.tp, "virtual_stages": p.v, "zero": p.zero,
            "recompute": p.recompute}


@pytest.fixture(scope="module")
def plans():
    return split.ranked(**split.CASE)


def test_the_reference_and_the_second_best_meet_the_target(plans, capsys):
    assert split.check(NAME, split.propose_split).ok
    assert split.propose_split(**split.CASE) == as_answer(plans[0])
    assert split.check(NAME, lambda *args: as_answer(plans[1])).ok  # a tie with the target passes
    assert split.check(NAME, stub).reference.ok
    split.show_solution(NAME)
    assert "def propose_split(model" in capsys.readouterr().out


def test_a_slower_split_is_told_how_far_from_the_target(plans):
    third = plans[2]
    assert third.step_time > plans[1].step_time
    report = split.check(NAME, lambda *args: as_answer(third))
    assert not report.ok
    percent = 100 * (third.step_time / plans[1].step_time - 1)
    assert f"{percent:.1f}% slower than the planner's second best" in str(report)
    slowest = max(plans, key=lambda p: p.step_time)
    text = str(split.check(NAME, lambda *args: as_answer(slowest)))
    assert "slower than its best; exposed communication per step:" in text


def test_a_split_that_does_not_fit_and_malformed_answers():
    # 16 data-parallel replicas of a whole 8B model at 32K tokens: every GPU holds all the activations
    over = str(split.check(NAME, lambda *args: {"dp": 16, "cp": 1, "tp": 1}))
    assert "dp=16 cp=1 tp=1 selective, ZeRO 1 does not fit: needs" in over and "of 80 GiB" in over
    assert "= 12, not the 16 GPUs" in str(split.check(NAME, lambda *args: {"dp": 1, "cp": 4, "tp": 3}))
    assert "unknown keys ['mesh']" in str(split.check(NAME, lambda *args: {"dp": 1, "cp": 4, "tp": 4, "mesh": 2}))
    assert "not a dict with at least dp, cp, tp" in str(split.check(NAME, lambda *args: (2, 8, 1)))
    assert "each must be a positive int" in str(split.check(NAME, lambda *args: {"dp": 2, "cp": 8, "tp": 1.0}))
    cannot = str(split.check(NAME, lambda *args: {"pp": 4, "dp": 1, "cp": 4, "tp": 1, "virtual_stages": 3}))
    assert "the planner cannot price" in cannot and "virtual_stages=3 does not run on pp=4" in cannot
    with pytest.raises(ValueError, match="no puzzle 'split'"):
        split.check("split", split.propose_split)
