"""Figures of what a run communicated, what it would cost, and when: plain matplotlib ``Figure``s.

Every figure is drawn from trace data (``CommTrace.group_by``, ``Estimate``, ``Timeline``), in bytes
and seconds *per rank* (the mean over the ranks of the run, like ``CommTrace.rows``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from ..context_parallel.attention import shard_sequence
from ..analysis.cost import Hardware, estimate, format_seconds, hardware
from .collectives import rank_colors
from ..analysis.timeline import Timeline
from ..core.trace import CommEvent, CommTrace, format_bytes

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send", "recv", "broadcast", "barrier")
BYTES = FuncFormatter(lambda v, _: format_bytes(v))
SECONDS = FuncFormatter(lambda v, _: format_seconds(v))


def op_color(op: str):
    """One colour per communication op, the same in every figure."""
    return colormaps["Set2"](OPS.index(op) % 8) if op in OPS else "grey"


def comm_bars(traces: CommTrace | dict[str, CommTrace], hw: Hardware | str | None = None,
              by: str = "scope") -> dict[str, dict[tuple[str, str], float]]:
    """{bar: {(op, phase): bytes sent per rank}}, or predicted seconds per rank with ``hw``.

    The bars are the values of the event field ``by`` in one trace (its scopes, or its mesh axes with
    ``by="axis"``), or the labels of a dict of traces (each summed over its scopes).
    """
    if isinstance(traces, CommTrace):
        return _stacks(traces, lambda e: getattr(e, by) or "-", hw)
    return {label: _stacks(trace, lambda e, label=label: label, hw).get(label, {}) for label, trace in traces.items()}


def _stacks(trace: CommTrace, bar: Callable[[CommEvent], str], hw: Hardware | str | None):
    n = len({e.rank for e in trace.events}) or 1

    def key(e: CommEvent) -> tuple[str, str, str]:
        return bar(e), e.op, e.phase

    totals = estimate(trace, hw).group_by(key) if hw is not None else \
        {k: v / n for k, v in trace.group_by(key).items()}
    bars: dict[str, dict[tuple[str, str], float]] = {}
    for (name, op, phase), value in totals.items():
        bars.setdefault(name, {})[op, phase] = value
    return bars


def plot_comm(traces: CommTrace | dict[str, CommTrace], hw: Hardware | str | None = None, title: str = "",
              by: str = "scope") -> Figure:
    """Bytes sent per rank, one bar per scope (``by="axis"``: per mesh axis; or per labelled trace), stacked by
    op and phase (backward hatched); with ``hw`` a second panel shows ``ts.cost.estimate`` of the same calls
    (one after another: a send and a receive posted together count twice — see the timeline)."""
    panels = [(comm_bars(traces, by=by), "sent per rank", BYTES)]
    if hw is not None:
        panels.append((comm_bars(traces, hw, by), f"time per rank, calls in sequence\n({hardware(hw).name})", SECONDS))
    fig = Figure(figsize=(4 + 1.2 * len(panels[0][0]), 3.6 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (bars, ylabel, formatter) in zip(axes, panels):
        scopes = list(bars)
        keys = sorted({k for stack in bars.values() for k in stack},
                      key=lambda k: (OPS.index(k[0]) if k[0] in OPS else len(OPS), k[1] != "forward"))
        bottom = np.zeros(len(scopes))
        for op, phase in keys:
            heights = np.array([bars[s].get((op, phase), 0.0) for s in scopes])
            ax.bar(scopes, heights, bottom=bottom, color=op_color(op), edgecolor="black", linewidth=0.5,
                   hatch="//" if phase == "backward" else None, label=f"{op} ({phase})")
            bottom += heights
        ax.set_ylabel(ylabel)
        ax.yaxis.set_major_formatter(formatter)
        ax.tick_params(axis="x", labelrotation=30)
        if keys:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[0].set_title(title or "communication per scope")
    fig.tight_layout()
    return fig


def plot_scaling(points: Sequence, x: str = "world_size", title: str = "") -> Figure:
    """Bytes sent and communication time per rank against ``x`` ("world_size" or "seq"), one colour
    per method; dashed: the time not hidden behind compute. ``points`` are ``tpsp_sim.sweep.Point``s."""
    methods = list(dict.fromkeys(p.method for p in points))
    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for i, method in enumerate(methods):
        mine = sorted((p for p in points if p.method == method), key=lambda p: getattr(p, x))
        xs, color = [getattr(p, x) for p in mine], colormaps["tab10"](i % 10)
        axes[0].plot(xs, [p.sent for p in mine], marker="o", color=color, label=method)
        axes[1].plot(xs, [p.seconds for p in mine], marker="o", color=color, label=method)
        axes[1].plot(xs, [p.exposed for p in mine], marker=".", color=color, linestyle="--", label=f"{method} exposed")
    for ax, ylabel, formatter in ((axes[0], "sent per rank", BYTES), (axes[1], "comm time per rank", SECONDS)):
        ax.set_xlabel({"world_size": "ranks", "seq": "sequence length"}.get(x, x))
        ax.set_xscale("log", base=2)
        ax.set_ylabel(ylabel)
        ax.yaxis.set_major_formatter(formatter)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].set_title("dashed: not hidden behind compute", fontsize=8)
    fig.suptitle(title or f"communication per transformer block as {x} grows")
    fig.tight_layout()
    return fig


def plot_timeline(tl: Timeline, title: str = "") -> Figure:
    """Gantt chart: per rank, compute (blue) and blocking calls on one lane, and the isend/irecv
    transfers in flight on a thin lane below it — where the two overlap, communication is hidden."""
    ranks = tl.ranks
    fig = Figure(figsize=(10, 0.9 * len(ranks) + 1.2))
    ax = fig.subplots()
    for i, rank in enumerate(ranks):
        y = len(ranks) - 1 - i
        for s in tl.of(rank):
            if s.kind == "compute":
                lane, color = (y + 0.35, 0.5), "tab:blue"
            else:
                thin = (y + 0.15, 0.15) if s.label == "send" else (y, 0.15)  # sends above receives
                lane, color = ((y + 0.35, 0.5) if s.blocking else thin), op_color(s.label)
            ax.broken_barh([(s.start, s.end - s.start)], lane, facecolors=color, edgecolor="black",
                           linewidth=0.3, hatch="//" if s.phase == "backward" else None)
    ax.set_yticks([len(ranks) - 1 - i + 0.5 for i in range(len(ranks))],
                  [f"rank {r}\nexposed {format_seconds(tl.exposed(r))}" for r in ranks], fontsize=8)
    ax.xaxis.set_major_formatter(SECONDS)
    ax.set_xlabel(f"time on {tl.hardware.name}")
    handles = [Patch(color="tab:blue", label="compute")]
    handles += [Patch(color=op_color(op), label=op) for op in sorted({s.label for s in tl.spans} - {"compute"})]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title or "timeline (thin bars: isend/irecv in flight; hatched: backward)")
    fig.tight_layout()
    return fig


def shard_owners(seq_len: int, world_size: int, layout: str) -> np.ndarray:
    """owner[i] = the rank that holds token i under ``layout`` ("contiguous" or "zigzag")."""
    owner = np.empty(seq_len, dtype=int)
    positions = torch.arange(seq_len)
    for rank in range(world_size):
        owner[shard_sequence(positions, rank, world_size, dim=0, layout=layout).numpy()] = rank
    return owner


def plot_shards(seq_len: int, world_size: int, layouts: Sequence[str] = ("contiguous", "zigzag")) -> Figure:
    """Per layout: which rank holds which token (left) and, for causal attention, which rank computes
    each (query, key) pair: the rank holding the query (right; pairs per rank in the title)."""
    cmap = ListedColormap(rank_colors(world_size))
    fig = Figure(figsize=(10, 3.4 * len(layouts)))
    axes = fig.subplots(len(layouts), 2, squeeze=False, gridspec_kw={"width_ratios": [2, 1]})
    for (left, right), layout in zip(axes, layouts):
        owner = shard_owners(seq_len, world_size, layout)
        held = np.where(owner[None, :] == np.arange(world_size)[:, None], owner[None, :], np.nan)
        left.imshow(held, cmap=cmap, vmin=-0.5, vmax=world_size - 0.5, aspect="auto", interpolation="nearest")
        left.set_yticks(range(world_size), [f"rank {r}" for r in range(world_size)])
        left.set_xlabel("token position")
        left.set_title(f"{layout}: tokens each rank holds")
        pairs = np.where(np.tri(seq_len, dtype=bool), owner[:, None], np.nan)
        right.imshow(pairs, cmap=cmap, vmin=-0.5, vmax=world_size - 0.5, interpolation="nearest")
        counts = [int((pairs == r).sum()) for r in range(world_size)]
        right.set_xlabel("key")
        right.set_ylabel("query")
        right.set_title(f"causal pairs per rank: {counts}", fontsize=8)
    fig.tight_layout()
    return fig
