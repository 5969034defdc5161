"""Pictures of one collective: what every rank holds before and after it.

Each rank is a row of cells, one cell per element (tensors are flattened). A cell takes the colour
of the rank whose input held that value, so data can be followed as it moves; a value no single
rank held (a sum over ranks) is grey. Give every rank distinct values (rank r holding 10·r + i,
say) for the colours to mean something. ``None`` draws an empty row (nothing held yet).
"""

from __future__ import annotations

from typing import Sequence

import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

REDUCED = "#c8c8c8"  # a value that no single rank held: the result of a reduction


def rank_colors(world_size: int) -> list:
    """One colour per rank (matplotlib's tab10, repeating after 10 ranks)."""
    return [colormaps["tab10"](r % 10) for r in range(world_size)]


def draw_collective(before: Sequence[torch.Tensor | None], after: Sequence[torch.Tensor | None],
                    title: str) -> Figure:
    """A figure with two panels, "before" and "after", one row per rank (``before[r]``, ``after[r]``)."""
    if len(before) != len(after):
        raise ValueError(f"draw_collective needs one tensor per rank before and after, "
                         f"got {len(before)} before and {len(after)} after")
    colors = rank_colors(len(before))
    owners: dict[float, set[int]] = {}
    for rank, x in enumerate(before):
        for v in _values(x):
            owners.setdefault(v, set()).add(rank)

    def color(v: float):
        held = owners.get(v, set())
        return colors[next(iter(held))] if len(held) == 1 else REDUCED

    widths = [max((len(_values(x)) for x in side), default=0) for side in (before, after)]
    fig = Figure(figsize=(0.42 * (sum(widths) + 2.5), 0.42 * len(before) + 0.7))
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(w, 1) for w in widths]})
    for ax, side, width, name in zip(axes, (before, after), widths, ("before", "after")):
        for rank, x in enumerate(side):
            y = len(side) - 1 - rank
            values = _values(x)
            for i, v in enumerate(values):
                ax.add_patch(Rectangle((i + 0.05, y + 0.08), 0.9, 0.84, facecolor=color(v), edgecolor="white"))
                ax.text(i + 0.5, y + 0.5, f"{v:g}", ha="center", va="center", fontsize=8)
            if not values:
                ax.text(0.1, y + 0.5, "(nothing)", va="center", fontsize=8, color="grey")
        ax.set_xlim(0, max(width, 1))
        ax.set_ylim(0, len(side))
        ax.set_yticks([len(side) - 0.5 - r for r in range(len(side))], [f"rank {r}" for r in range(len(side))])
        for r, label in enumerate(ax.get_yticklabels()):
            label.set_color(colors[r])
        ax.set_xticks([])
        ax.tick_params(length=0)
        ax.set_frame_on(False)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _values(x: torch.Tensor | None) -> list[float]:
    return [] if x is None else x.detach().reshape(-1).tolist()
