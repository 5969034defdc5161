"""A pipeline schedule drawn: one row per rank, one box per action (F, B, W of a micro-batch), in time.

The times are the program's dry run (``ts.pipeline.dry_run``: F = B = W = 1 unit by default, a B
without its W the whole backward, 2 units); the white space is the bubble. ``until=t`` draws only
what has started by time t, for a step-through (``ts.viz.widgets.stepper(lambda t: plot_schedule(...,
until=t), steps)``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..pipeline.actions import Action
from ..pipeline.dry_run import bubble, dry_run

COLORS = {"F": "tab:blue", "B": "tab:green", "W": "tab:orange"}
NAMES = {"F": "F forward", "B": "B backward (input gradient only when a W follows)", "W": "W weight gradient"}


def plot_schedule(program: Mapping[int, Sequence[Action]], p: int, m: int, v: int = 1, *,
                  costs: Mapping[str, float] | None = None, until: float | None = None, title: str = "") -> Figure:
    """Gantt chart of ``program`` on ``p`` ranks × ``v`` chunks with ``m`` micro-batches; the title gives each
    rank's idle fraction (the bubble). Later chunks are drawn hatched."""
    slots = dry_run(program, p, v, m, costs)
    end = max(s.end for s in slots)
    fig = Figure(figsize=(min(16, 2 + 0.32 * end), 0.5 * p + 1.3))
    ax = fig.subplots()
    for s in slots:
        if until is not None and s.start >= until:
            continue
        ax.barh(p - 1 - s.rank, s.end - s.start, left=s.start, color=COLORS[s.action.kind], edgecolor="black",
                linewidth=0.5, hatch="//" if s.action.chunk else None, alpha=0.85)
        ax.text((s.start + s.end) / 2, p - 1 - s.rank, str(s.action.microbatch), ha="center", va="center",
                fontsize=7, color="white")
    ax.set_xlim(0, end)
    ax.set_yticks(range(p), [f"rank {r}" for r in reversed(range(p))], fontsize=8)
    ax.set_xlabel("time (units of one F)")
    kinds = sorted({s.action.kind for s in slots}, key="FBW".index)
    ax.legend(handles=[Patch(color=COLORS[k], label=NAMES[k]) for k in kinds], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.0, 1.0))
    idle = bubble(slots)
    ax.set_title((title + ": " if title else "") + f"bubble {max(idle.values()):.0%} of {end:g} units", fontsize=10)
    fig.tight_layout()
    return fig
