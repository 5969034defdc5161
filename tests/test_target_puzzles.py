"""The puzzles of notebooks 04 and 07 (issue 22 §3): each reference answer meets its target, and a wrong
answer is told how far from the target it is."""

from __future__ import annotations

import pytest

import tpsp_sim as ts
from tpsp_sim.exercises import costs, mesh


def stub(*args):
    raise NotImplementedError


@pytest.mark.parametrize("key", costs.LINKS)
def test_the_smallest_hiding_block_is_where_the_simulated_ring_stops_waiting(key):
    """The closed form's c hides the ring on the timeline, c − 1 does not (3 ranks: odd), latency included."""
    hw = ts.cost.PRESETS[key]
    c = costs.block_size(hw, costs.HEADS, costs.HEAD_DIM)
    assert costs.exposed(hw, c, 3) == 0 < costs.exposed(hw, c - 1, 3)
    assert c > ts.cost.ring_overlap_block(hw)  # F/B leaves out α


def test_ring_block_size_right_and_wrong_answers(capsys):
    assert costs.check("ring_block_size", costs.block_size).ok
    costs.show_solution("ring_block_size")
    assert "def block_size(hw" in capsys.readouterr().out
    report = costs.check("ring_block_size", stub)
    assert report.reference is not None and report.reference.ok
    # F/B alone (Liu et al., no latency): short by the latency's share, and told so
    short = str(costs.check("ring_block_size", lambda hw, h, d: round(ts.cost.ring_overlap_block(hw))))
    assert "A100 NVLink: c = 1,040 tokens per rank leaves 2.0 µs exposed" in short
    assert "131 tokens (11.2%) short of the smallest block" in short and "leaves out the latency" in short
    double = str(costs.check("ring_block_size", lambda hw, h, d: 2 * costs.block_size(hw, h, d)))
    assert "c = 2,342 hides the ring, but so does 1,171: 2.00 × the smallest block" in double
    assert "not a positive int" in str(costs.check("ring_block_size", lambda hw, h, d: 1040.5))
    with pytest.raises(ValueError, match="no puzzle 'ring'"):
        costs.check("ring", costs.block_size)


def test_mesh_under_memory_cap_right_and_wrong_answers(capsys):
    assert mesh.check("mesh_under_memory_cap", mesh.choose_mesh).ok
    mesh.show_solution("mesh_under_memory_cap")
    assert "def choose_mesh(model" in capsys.readouterr().out
    assert mesh.check("mesh_under_memory_cap", stub).reference.ok
    # the planner's own prices pick the wrong answers, so they stay wrong whatever the cost model's numbers
    case = mesh.CASE
    plans = mesh.priced(case["model"], case["seq"], case["gpus"], case["cap"])
    slowest = max((p for p in plans if p.runs), key=lambda p: p.step_time)
    too_big = next(p for p in plans if p.memory.total > case["cap"])
    slow = str(mesh.check("mesh_under_memory_cap", lambda *args: (slowest.dp, slowest.cp, slowest.tp)))
    assert f"(dp, cp, tp) = {(slowest.dp, slowest.cp, slowest.tp)} fits" in slow
    assert "% slower than the fastest mesh that fits" in slow
    over = str(mesh.check("mesh_under_memory_cap", lambda *args: (too_big.dp, too_big.cp, too_big.tp)))
    assert "GiB per GPU" in over and "GiB over the cap of 60.0 GiB" in over
    assert "= 12, not the 16 GPUs" in str(mesh.check("mesh_under_memory_cap", lambda *args: (2, 2, 3)))
