"""The schedule drawing: one box per action, placed at its dry-run time; the title says the bubble."""

from __future__ import annotations

import pytest

import tpsp_sim as ts
from tpsp_sim.viz.pipeline_plot import plot_schedule

CASES = [(ts.ScheduleGPipe, 1), (ts.Schedule1F1B, 1), (ts.ScheduleInterleaved1F1B, 2), (ts.ScheduleZBH1, 1)]


@pytest.mark.parametrize("schedule,v", CASES, ids=lambda a: getattr(a, "__name__", a))
def test_one_box_per_action_and_the_bubble_in_the_title(schedule, v):
    p, m = 4, 8
    program = schedule.make_program(p, m, v)
    ax = plot_schedule(program, p, m, v).axes[0]
    assert len(ax.patches) == sum(len(actions) for actions in program.values())
    assert f"bubble {schedule.bubble_fraction(p, m, v):.0%}" in ax.get_title()
    starts = sorted(box.get_x() for box in ax.patches)
    assert starts[0] == 0 and ax.get_xlim()[1] == max(box.get_x() + box.get_width() for box in ax.patches)


def test_until_draws_only_what_has_started():
    program = ts.Schedule1F1B.make_program(2, 2)  # starts: rank 0 F0 F1 B0 B1 at 0, 1, 4, 7; rank 1 F0 B0 F1 B1 at 1, 2, 4, 5
    assert len(plot_schedule(program, 2, 2, until=3).axes[0].patches) == 4  # F0 F1 (rank 0), F0 B0 (rank 1)
