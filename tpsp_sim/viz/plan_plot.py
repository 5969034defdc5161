"""The planner's figure: one stacked bar per plan, its step time split into compute, exposed
communication per mesh axis (the pipeline's point-to-point transfers on "pp"), idle time and the pipeline bubble."""

from __future__ import annotations

from matplotlib.figure import Figure

from ..analysis.planner import EXPOSED, Plan
from .plot import SECONDS

PARTS = (("compute", "tab:blue"), ("tp", "tab:orange"), ("cp", "tab:green"), ("pp", "tab:purple"),
         ("dp_cp", "tab:red"), ("idle", "lightgrey"), ("bubble", "white"))
MARGIN = 0.05  # the x axis runs 5% past the longest bar


def label(p: Plan) -> str:
    """``dp=2 cp=4 tp=8 ring, full``, with ``pp=4 v=2`` in front under pipeline and ``, zero 3`` unless ZeRO 1."""
    pipeline = f"pp={p.pp} " + (f"v={p.v} " if p.v > 1 else "") if p.pp > 1 else ""
    zero = f", zero {p.zero}" if p.zero != 1 else ""
    return f"{pipeline}dp={p.dp} cp={p.cp} tp={p.tp} {p.attention}, {p.recompute}{zero}"


def plot_plans(plans: list[Plan], top: int = 10, title: str = "") -> Figure:
    """Horizontal stacked bars of the first ``top`` plans that run, best at the top."""
    shown = [p for p in plans if p.runs][:top]
    if not shown:
        raise ValueError("no plan runs: nothing to plot (every plan does not fit or cannot run; see their .why)")
    fig = Figure(figsize=(10, 0.45 * len(shown) + 1.4), layout="constrained")
    ax = fig.subplots()
    for i, p in enumerate(shown):
        y, left = len(shown) - 1 - i, 0.0
        values = {"compute": p.compute, **{a: p.exposed[a] for a in EXPOSED}, "idle": p.idle, "bubble": p.bubble}
        for name, color in PARTS:
            ax.barh(y, values[name], left=left, color=color, edgecolor="black", linewidth=0.3,
                    label=(f"exposed {name}" if name in EXPOSED else name) if i == 0 else None)
            left += values[name]
    ax.set_yticks(range(len(shown)), [label(p) for p in reversed(shown)], fontsize=8)
    ax.set_xlim(0, (1 + MARGIN) * max(p.step_time for p in shown))  # room right of the longest bar
    ax.xaxis.set_major_formatter(SECONDS)
    ax.set_xlabel("predicted step time")
    fig.legend(fontsize=7, loc="outside right upper")  # beside the axes: it covers no bar
    ax.set_title(title or "plans, best first", fontsize=10)
    return fig
