"""Figures of what a run communicated, what it would cost, and when: plain matplotlib ``Figure``s.

Every figure is drawn from trace data (``CommTrace.group_by``, ``Estimate``, ``Timeline``), in bytes
and seconds *per rank* (the mean over the ranks of the run, like ``CommTrace.rows``).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.axis import Axis
from matplotlib.ticker import Formatter, FuncFormatter, Locator, LogLocator, NullLocator

from ..context_parallel.attention import sequence_positions
from ..analysis.cluster import Cluster, cluster
from ..analysis.cost import estimate, format_seconds
from .collectives import rank_colors
from ..analysis.replay import Timeline
from ..core import ops
from ..core.trace import PHASES, CommEvent, CommTrace, format_bytes

OPS = tuple(ops.OPS)  # stacking order
HATCH = {"forward": None, "backward": "//", "grad_sync": ".."}  # one per trace.PHASES
SECONDS = FuncFormatter(lambda v, _: format_seconds(v))


UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def _unit(vmax: float) -> int:
    """The power of 1024 whose unit the largest value on an axis is written in."""
    return min(len(UNITS) - 1, max(0, int(math.log(max(abs(vmax), 1.0), 1024))))


class BinaryLocator(Locator):
    """Byte ticks at round values of the axis's binary unit (B, KiB, MiB, GiB): steps of 1, 2, 4, 5 or 8
    × 10ⁿ of it, or ½, ¼, ⅛ (512, 256, 128 of the unit below) — 0, 5, 10, 15 MiB rather than 9.5, 19.1,
    28.6 MiB, never 0.8 MiB; whole bytes only, so never "1 B, 1 B, 0 B"."""

    STEPS = (0.125, 0.25, 0.5) + tuple(m * 10 ** n for n in range(4) for m in (1, 2, 4, 5, 8))
    MAX_TICKS = 6  # intervals

    def __call__(self):
        return self.tick_values(*self.axis.get_view_interval())

    def tick_values(self, vmin: float, vmax: float):
        low, high = sorted((vmin, vmax))
        unit = 1024 ** _unit(max(abs(low), abs(high)))
        steps = [step for step in self.STEPS if unit > 1 or step >= 1]
        step = next((st for st in steps if (high - low) / unit / st <= self.MAX_TICKS), steps[-1])
        return np.arange(math.floor(low / unit / step), math.ceil(high / unit / step) + 1) * step * unit


class BinaryFormatter(Formatter):
    """A byte tick in the axis's unit, with no trailing zeros: "0 B", "512 KiB", "1.5 MiB"."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        vmax = max(abs(v) for v in self.axis.get_view_interval()) if self.axis is not None else abs(x)
        power = _unit(vmax) if x else 0
        return f"{x / 1024 ** power:.4g} {UNITS[power]}"


class BinaryLogLocator(LogLocator):
    """Byte ticks on a log axis at powers of two whose exponents are multiples of 1, 2, 5 or 10
    (at most ``numticks``): 1 KiB, 1 MiB, 1 GiB, or 1 KiB, 32 KiB, 1 MiB, ... on shorter ranges."""

    def tick_values(self, vmin: float, vmax: float):
        low, high = math.log2(max(min(vmin, vmax), 1.0)), math.log2(max(vmin, vmax, 2.0))
        numticks = self.numticks if isinstance(self.numticks, int) else 8
        stride = next(s for s in (1, 2, 5, 10, 20, 30) if (high - low) / s < numticks)
        return 2.0 ** (stride * np.arange(math.floor(low / stride), math.ceil(high / stride) + 1))


def byte_axis(axis: Axis) -> None:
    """Ticks of a bytes axis at round binary values (powers of 2 on a log axis), labelled in B/KiB/MiB/GiB."""
    if axis.get_scale() == "log":
        axis.set_major_locator(BinaryLogLocator(base=2, numticks=8))
        axis.set_minor_locator(NullLocator())  # base-10 minor ticks would be labelled 2×10³ etc.
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1024 ** _unit(v):.4g} {UNITS[_unit(v)]}"))
    else:
        axis.set_major_locator(BinaryLocator())
        axis.set_major_formatter(BinaryFormatter())


def seconds_axis(axis: Axis) -> None:
    axis.set_major_formatter(SECONDS)


def op_color(op: str):
    """One colour per communication op, the same in every figure."""
    return ops.OPS[op].color if op in ops.OPS else "grey"


def comm_bars(traces: CommTrace | dict[str, CommTrace], hw: Cluster | str | None = None,
              by: str = "scope") -> dict[str, dict[tuple[str, str], float]]:
    """{bar: {(op, phase): bytes sent per rank}}, or predicted seconds per rank with ``hw``.

    The bars are the values of the event field ``by`` in one trace (its scopes, or its mesh axes with
    ``by="axis"``), or the labels of a dict of traces (each summed over its scopes).
    """
    if isinstance(traces, CommTrace):
        return _stacks(traces, lambda e: getattr(e, by) or "-", hw)
    return {label: _stacks(trace, lambda e, label=label: label, hw).get(label, {}) for label, trace in traces.items()}


def _stacks(trace: CommTrace, bar: Callable[[CommEvent], str], hw: Cluster | str | None):
    n = len(trace.ranks) or 1

    def key(e: CommEvent) -> tuple[str, str, str]:
        return bar(e), e.op, e.phase

    sums = estimate(trace, hw).group_by(key) if hw is not None else trace.group_by(key)
    totals = {k: v / n for k, v in sums.items()}
    bars: dict[str, dict[tuple[str, str], float]] = {}
    for (name, op, phase), value in totals.items():
        bars.setdefault(name, {})[op, phase] = value
    return bars


def plot_comm(traces: CommTrace | dict[str, CommTrace], hw: Cluster | str | None = None, title: str = "",
              by: str = "scope", totals: bool = False) -> Figure:
    """Bytes sent per rank, one bar per scope (``by="axis"``: per mesh axis; or per labelled trace), stacked by
    op and phase (backward hatched //, grad_sync dotted), with ``totals`` its total written above it; with ``hw`` a second panel shows ``ts.cost.estimate`` of the same calls
    (one after another, except that a send and a receive posted together overlap; the timeline also overlaps compute)."""
    panels = [(comm_bars(traces, by=by), "sent per rank", byte_axis, format_bytes)]
    if hw is not None:
        panels.append((comm_bars(traces, hw, by), f"time per rank, calls in sequence\n({cluster(hw).name})",
                       seconds_axis, format_seconds))
    fig = Figure(figsize=(4 + 1.2 * len(panels[0][0]), 3.6 * len(panels)))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (bars, ylabel, style, label) in zip(axes, panels):
        scopes = list(bars)
        keys = sorted({k for stack in bars.values() for k in stack},
                      key=lambda k: (OPS.index(k[0]) if k[0] in OPS else len(OPS), PHASES.index(k[1])))
        bottom = np.zeros(len(scopes))
        for op, phase in keys:
            heights = np.array([bars[s].get((op, phase), 0.0) for s in scopes])
            if not heights.any():  # e.g. receives: they send nothing
                continue
            segments = ax.bar(scopes, heights, bottom=bottom, color=op_color(op), edgecolor="black", linewidth=0.5,
                              hatch=HATCH[phase], label=f"{op} ({phase})")
            for patch in segments:  # an empty segment on top of the tallest stack would pin the y-limit to it
                if not patch.get_height():
                    patch.sticky_edges.y.clear()
            bottom += heights
        if totals:  # a bar too small to see still says what it holds
            for x, total in enumerate(bottom):
                ax.annotate(label(total), (x, total), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.margins(y=0.15 if totals else 0.08)
        style(ax.yaxis)
        ax.tick_params(axis="x", labelrotation=30)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[0].set_title(title or "communication per scope")
    fig.tight_layout()
    return fig


def plot_scaling(points: Sequence, x: str = "world_size", title: str = "") -> Figure:
    """Bytes sent and communication time per rank against ``x`` ("world_size" or "seq"), one colour per
    method. Solid: the activations' traffic of one micro-batch (forward + backward); dashed: its time not
    hidden behind compute; dotted: the gradient reduction, once per optimizer step (drawn where a method
    has one). ``points`` are ``tpsp_sim.sweep.Point``s."""
    methods = list(dict.fromkeys(p.method for p in points))
    fig = Figure(figsize=(10, 4.2))
    axes = fig.subplots(1, 2)
    for i, method in enumerate(methods):
        mine = sorted((p for p in points if p.method == method), key=lambda p: getattr(p, x))
        xs, color = [getattr(p, x) for p in mine], colormaps["tab10"](i % 10)
        axes[0].plot(xs, [p.activation for p in mine], marker="o", color=color, label=method)
        axes[1].plot(xs, [p.seconds for p in mine], marker="o", color=color, label=method)
        axes[1].plot(xs, [p.exposed for p in mine], marker=".", color=color, linestyle="--", label=f"{method} exposed")
        if any(p.grad_sync for p in mine):
            axes[0].plot(xs, [p.grad_sync for p in mine], marker="x", color=color, linestyle=":",
                         label=f"{method} gradients")
            axes[1].plot(xs, [p.grad_seconds for p in mine], marker="x", color=color, linestyle=":",
                         label=f"{method} gradients")
    for ax, ylabel, style in ((axes[0], "sent per rank", byte_axis), (axes[1], "comm time per rank", seconds_axis)):
        ax.set_xlabel({"world_size": "ranks", "seq": "sequence length"}.get(x, x))
        ax.set_xscale("log", base=2)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        style(ax.yaxis)
        ax.grid(alpha=0.3)
    axes[0].legend(handles=[line for line in axes[0].get_lines() if not line.get_label().endswith(" gradients")],
                   fontsize=8)
    axes[0].set_title("solid: activations, per micro-batch; dotted: gradients, per step", fontsize=8)
    axes[1].set_title("dashed: not hidden behind compute; dotted: gradients, per step", fontsize=8)
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
                           linewidth=0.3, hatch=HATCH[s.phase])
    ax.set_yticks([len(ranks) - 1 - i + 0.5 for i in range(len(ranks))],
                  [f"rank {r}\nexposed {format_seconds(tl.exposed(r))}" for r in ranks], fontsize=8)
    ax.xaxis.set_major_formatter(SECONDS)
    ax.set_xlabel(f"time on {tl.hardware.name}")
    handles = [Patch(color="tab:blue", label="compute")]
    handles += [Patch(color=op_color(op), label=op) for op in sorted({s.label for s in tl.spans} - {"compute"})]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title or "timeline (thin bars: isend/irecv in flight; hatched: backward, dotted: grad_sync)")
    fig.tight_layout()
    return fig


def shard_owners(seq_len: int, world_size: int, layout: str) -> np.ndarray:
    """owner[i] = the rank that holds token i under ``layout`` ("contiguous" or "zigzag")."""
    owner = np.empty(seq_len, dtype=int)
    for rank in range(world_size):
        owner[sequence_positions(seq_len, rank, world_size, layout).numpy()] = rank
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


def plot_token_owners(tokens: dict[str, Sequence[Sequence[int]]], title: str = "") -> Figure:
    """One row per entry: each token position coloured by the rank that holds it, "r<rank>" written in it
    (blank: held by none). ``tokens[name][rank]`` are the global positions rank ``rank`` holds, as
    ``ts.hybrid_positions`` gives them. A ``ValueError`` if two ranks of one row claim a position."""
    seq = 1 + max((t for per_rank in tokens.values() for held in per_rank for t in held), default=-1)
    world = max((len(per_rank) for per_rank in tokens.values()), default=1)
    grid = np.full((len(tokens), max(seq, 1)), np.nan)
    for row, (name, per_rank) in enumerate(tokens.items()):
        for rank, held in enumerate(per_rank):
            for t in held:
                if not np.isnan(grid[row, t]):
                    raise ValueError(f"plot_token_owners: {name}: token {t} is held by rank {int(grid[row, t])} "
                                     f"and rank {rank}")
                grid[row, t] = rank
    fig = Figure(figsize=(max(6.0, 0.42 * seq + 1.6), 0.5 * len(tokens) + 1.1))
    ax = fig.subplots()
    ax.imshow(grid, cmap=ListedColormap(rank_colors(world)), vmin=-0.5, vmax=world - 0.5, aspect="auto",
              interpolation="nearest")
    for (row, t), rank in np.ndenumerate(grid):
        if not np.isnan(rank):
            ax.text(t, row, f"r{int(rank)}", ha="center", va="center", fontsize=7, color="white", weight="bold")
    ax.set_yticks(range(len(tokens)), list(tokens))
    ax.set_xticks(range(seq))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("token position")
    ax.set_title(title or "which rank holds each token")
    fig.tight_layout()
    return fig
