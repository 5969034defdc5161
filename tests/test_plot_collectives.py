"""draw_collective: one row per rank, cells coloured by the rank that held the value, grey for sums."""

import pytest
import torch
from matplotlib.colors import to_rgba

import tpsp_sim as ts
from tpsp_sim.viz.collectives import REDUCED, draw_collective, rank_colors


def cells(ax):
    """(row from the top, value text, face colour) of every cell drawn in ``ax``, in drawing order."""
    colour = {(round(r.get_x()), round(r.get_y())): r.get_facecolor() for r in ax.patches}
    top = round(ax.get_ylim()[1]) - 1
    found = []
    for t in ax.texts:
        if t.get_text() != "(nothing)":
            x, y = (round(v - 0.5) for v in t.get_position())
            found.append((top - y, t.get_text(), colour[x, y]))
    return found


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_all_gather_cells_keep_their_rank_colour(p):
    before = [torch.arange(2.0) + 10 * r for r in range(p)]
    res = ts.run(lambda comm: comm.all_gather(before[comm.rank]), world_size=p)
    fig = draw_collective(before, res.outputs, "all_gather")
    left, right = fig.axes
    colors = [to_rgba(c) for c in rank_colors(p)]
    assert cells(left) == [(r, f"{10 * r + i}", colors[r]) for r in range(p) for i in range(2)]
    assert cells(right) == [(r, f"{10 * s + i}", colors[s]) for r in range(p) for s in range(p) for i in range(2)]
    assert [t.get_text() for t in left.get_yticklabels()] == [f"rank {r}" for r in range(p)]


def test_sums_are_grey_and_none_draws_an_empty_row():
    before = [torch.tensor([1.0, 2.0]), None, torch.tensor([10.0, 20.0])]
    after = [torch.tensor([11.0, 22.0]), torch.tensor([1.0, 20.0]), None]
    left, right = draw_collective(before, after, "mixed").axes
    colors = [to_rgba(c) for c in rank_colors(3)]
    assert cells(right) == [(0, "11", to_rgba(REDUCED)), (0, "22", to_rgba(REDUCED)), (1, "1", colors[0]), (1, "20", colors[2])]
    assert cells(left) == [(0, "1", colors[0]), (0, "2", colors[0]), (2, "10", colors[2]), (2, "20", colors[2])]
    assert [t.get_position()[1] for t in left.texts + right.texts if t.get_text() == "(nothing)"] == [1.5, 0.5]


def test_one_tensor_per_rank_before_and_after():
    with pytest.raises(ValueError, match="2 before and 3 after"):
        draw_collective([torch.ones(1)] * 2, [torch.ones(1)] * 3, "bad")
