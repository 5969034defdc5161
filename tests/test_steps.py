"""The step-by-step pictures come from real runs on virtual ranks: the states they draw are checked
against what a ring all-reduce and ring attention must hold at each step (worked out by hand)."""

from __future__ import annotations

import matplotlib
import pytest

from tpsp_sim.viz.steps import (plot_ring_all_reduce, plot_ring_attention, ring_all_reduce_states,
                                ring_attention_states)

matplotlib.use("Agg")


@pytest.mark.parametrize("p", [2, 3, 4, 5])
def test_ring_all_reduce_states(p):
    states = ring_all_reduce_states(p)
    everyone = 2 ** p - 1
    assert [s.phase for s in states] == ["start"] + ["reduce-scatter"] * (p - 1) + ["all-gather"] * (p - 1)
    assert states[0].held == tuple((2 ** r,) * p for r in range(p))          # rank r holds 2^r everywhere
    after_rs = states[p - 1]
    assert all(after_rs.held[r][r] == everyone for r in range(p))             # chunk r complete on rank r
    assert all(bin(after_rs.held[r][c]).count("1") < p for r in range(p) for c in range(p) if c != r)
    assert all(row == (everyone,) * p for row in states[-1].held)            # all-reduce done
    for step, state in enumerate(states[1:], start=1):                        # one chunk arrives per step
        assert all(state.received[r] is not None and state.held[r] != states[step - 1].held[r] for r in range(p))


def test_ring_all_reduce_states_on_three_ranks_by_hand():
    """Bitmasks 1, 2, 4 (ranks 0, 1, 2). Reduce-scatter step s: rank r adds the chunk r-1-s of rank r-1
    to its chunk r-2-s; all-gather step s: rank r takes the complete chunk r-1-s of rank r-1."""
    states = ring_all_reduce_states(3)
    assert [s.held for s in states] == [
        ((1, 1, 1), (2, 2, 2), (4, 4, 4)),
        ((1, 5, 1), (2, 2, 3), (6, 4, 4)),  # 5 = 1 + 4 (rank 2's chunk 1), 3 = 2 + 1, 6 = 4 + 2
        ((7, 5, 1), (2, 7, 3), (6, 4, 7)),  # chunk r complete on rank r
        ((7, 5, 7), (7, 7, 3), (6, 7, 7)),
        ((7, 7, 7), (7, 7, 7), (7, 7, 7)),
    ]
    assert [s.received for s in states] == [(None, None, None), (1, 2, 0), (0, 1, 2), (2, 0, 1), (1, 2, 0)]


def test_ring_all_reduce_needs_two_to_sixteen_ranks():
    with pytest.raises(ValueError, match="2 to 16 ranks, got world_size=1"):
        ring_all_reduce_states(1)


def test_ring_attention_states_causal_contiguous_and_zigzag():
    p, n = 4, 4
    diagonal = n * (n + 1) // 2
    contiguous = ring_attention_states(p, n)
    for r, steps in enumerate(contiguous):
        assert [s.block for s in steps] == [(r - t) % p for t in range(p)]
        assert [int(s.pairs.sum()) for s in steps] == [diagonal] + [n * n if t <= r else 0 for t in range(1, p)]
        assert steps[-1].error < 1e-12                                           # the ring ends at dense attention
        assert r == 0 or steps[0].error > 0.1                                    # and not before its blocks arrive
    zigzag = ring_attention_states(p, n, layout="zigzag")
    for steps in zigzag:
        # chunks r and 2p-1-r: the diagonal tile is causal in local order too, then half tiles
        assert [int(s.pairs.sum()) for s in steps] == [diagonal] + [n * n // 2] * (p - 1)
        assert steps[-1].error < 1e-12


def test_the_pictures_draw_every_step_or_one():
    assert len([ax for ax in plot_ring_all_reduce(3).axes if ax.get_visible()]) == 5   # start + 2(p-1)
    assert len(plot_ring_all_reduce(3, step=2).axes) == 1
    assert len(plot_ring_attention(3, tokens_per_rank=2).axes) == 9
    fig = plot_ring_attention(3, tokens_per_rank=2, step=1)
    assert len(fig.axes) == 3 and fig.get_suptitle().endswith("step 1")
    assert [ax.get_xlabel() for ax in fig.axes] == [f"rank {r}: keys" for r in range(3)]


def test_one_step_is_drawn_large_enough_to_read():
    """A player's frame (issue 22 §4): at least 500 px wide at the widget's 80 dpi, labels of 11 pt or more."""
    from tpsp_sim.viz.widgets import DPI

    for fig in (plot_ring_all_reduce(4, step=3), plot_ring_attention(4, tokens_per_rank=4, step=2)):
        assert fig.get_size_inches()[0] * DPI >= 500
        sizes = [label.get_fontsize() for ax in fig.axes for label in (ax.title, ax.xaxis.label, ax.yaxis.label)
                 if label.get_text()]
        assert sizes and min(sizes) >= 11


def test_stepper_plays_the_frames():
    pytest.importorskip("ipywidgets")
    from tpsp_sim.viz.widgets import stepper

    box = stepper(lambda i: plot_ring_all_reduce(2, step=i), 3)
    first = box.image.value
    box.slider.value = 2
    assert box.image.value != first and box.slider.max == 2
