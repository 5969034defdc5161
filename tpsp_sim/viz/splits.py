"""Pictures of how tensor parallelism splits a layer, read off the shards the ranks really hold.

``plot_tp_mlp(fc1, fc2, fc1_shards, fc2_shards)`` draws a column-parallel fc1 and a row-parallel fc2 on
t ranks: X (every rank), f, fc1.weight [d_ff, h] coloured by the rank holding each row, the hidden
activation's columns, fc2.weight [h, d_ff] coloured by the rank holding each column, the partial sums and
f̄. ``plot_qkv_heads(qkv, splits, heads)`` draws the fused qkv weight [3h, h] of attention, each row
coloured by the rank holding it, for each way of splitting it. The shards are the ranks' weights (e.g.
``ColumnParallelLinear.from_dense(fc1, comm).weight`` from a run); each row (column) is matched against
the dense weight, so the picture is the split the code made, not a drawing of it.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from .collectives import rank_colors

EVERY_RANK = "#bdbdbd"  # a value every rank holds whole


def owners(dense: torch.Tensor, shards: list[torch.Tensor], dim: int) -> list[int]:
    """For each index of ``dense`` along ``dim``, the rank whose shard holds that slice (-1: none)."""
    found = []
    for i in range(dense.shape[dim]):
        line = dense.select(dim, i)
        found.append(next((r for r, s in enumerate(shards)
                           if any(torch.equal(line, s.select(dim, j)) for j in range(s.shape[dim]))), -1))
    return found


def _grid(ax, x0: float, y0: float, rows: int, cols: int, color_of, label: str, cell: float = 0.3,
          hatch: str | None = None) -> float:
    """Draw a rows x cols matrix with its top-left corner at (x0, y0); return its right edge."""
    for i in range(rows):
        for j in range(cols):
            ax.add_patch(Rectangle((x0 + j * cell, y0 - (i + 1) * cell), cell, cell, facecolor=color_of(i, j),
                                   edgecolor="white", linewidth=0.6, hatch=hatch))
    ax.text(x0 + cols * cell / 2, y0 + 0.12, label, ha="center", va="bottom", fontsize=9)
    return x0 + cols * cell


def _arrow(ax, x0: float, x1: float, y: float, label: str) -> None:
    ax.annotate("", (x1, y), (x0, y), arrowprops={"arrowstyle": "->", "lw": 1.2})
    ax.text((x0 + x1) / 2, y + 0.08, label, ha="center", va="bottom", fontsize=10, fontweight="bold")


def plot_tp_mlp(fc1: torch.Tensor, fc2: torch.Tensor, fc1_shards: list[torch.Tensor],
                fc2_shards: list[torch.Tensor], tokens: int = 3) -> Figure:
    """Column-parallel fc1 → GELU → row-parallel fc2 on ``len(fc1_shards)`` ranks, every piece coloured
    by the rank holding it (``fc1``, ``fc2``: the dense weights; the shards: each rank's weight)."""
    t, (d_ff, h) = len(fc1_shards), fc1.shape
    rows_of = owners(fc1.detach(), [w.detach() for w in fc1_shards], 0)  # fc1: [d_ff, h], rank r keeps rows
    cols_of = owners(fc2.detach(), [w.detach() for w in fc2_shards], 1)  # fc2: [h, d_ff], rank r keeps columns
    colors = rank_colors(t)
    fig = Figure(figsize=(11, 3.6))
    ax = fig.subplots()
    top = 0.0
    x = _grid(ax, 0, top, tokens, h, lambda i, j: EVERY_RANK, "X [tokens, h]\nevery rank")
    _arrow(ax, x + 0.1, x + 0.8, top - 0.5, "f")
    x = _grid(ax, x + 0.9, top, d_ff, h, lambda i, j: colors[rows_of[i]], "fc1.weight [d_ff, h]\nrank r: its rows")
    _arrow(ax, x + 0.1, x + 0.8, top - 0.5, "GELU")
    x = _grid(ax, x + 0.9, top, tokens, d_ff, lambda i, j: colors[rows_of[j]], "hidden [tokens, d_ff]\nrank r: its columns")
    _arrow(ax, x + 0.1, x + 0.8, top - 0.5, "")
    x = _grid(ax, x + 0.9, top, h, d_ff, lambda i, j: colors[cols_of[j]], "fc2.weight [h, d_ff]\nrank r: its columns")
    _arrow(ax, x + 0.1, x + 0.8, top - 0.5, "")
    right = x + 0.9
    for r in range(t):  # one partial sum per rank, stacked
        _grid(ax, right + 0.25 * r, top - 0.25 * r, tokens, h, lambda i, j, r=r: colors[r],
              "partial Y, one per rank" if r == 0 else "")
    x = right + 0.25 * (t - 1) + h * 0.3
    _arrow(ax, x + 0.1, x + 0.8, top - 0.5, "f̄")
    _grid(ax, x + 0.9, top, tokens, h, lambda i, j: EVERY_RANK, "Y = Σ partials\nevery rank")
    ax.set_xlim(-0.2, x + 0.9 + h * 0.3 + 0.2)
    ax.set_ylim(-max(d_ff, tokens + t) * 0.3 - 0.5, 0.9)
    ax.set_aspect("equal")
    ax.axis("off")
    handles = [Rectangle((0, 0), 1, 1, color=colors[r]) for r in range(t)] + [Rectangle((0, 0), 1, 1, color=EVERY_RANK)]
    ax.legend(handles, [f"rank {r}" for r in range(t)] + ["every rank"], loc="lower center", ncol=t + 1,
              fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.12))
    fig.suptitle(f"a tensor-parallel MLP on {t} ranks: f before the column layer, f̄ after the row layer",
                 fontsize=11)
    fig.tight_layout()
    return fig


def plot_qkv_heads(qkv: torch.Tensor, splits: dict[str, list[torch.Tensor]], heads: int) -> Figure:
    """The fused qkv weight's rows [q | k | v] (each [heads, head_dim]), coloured by the rank holding them,
    one row of the figure per way of splitting it (``splits``: name -> each rank's weight)."""
    dense = qkv.detach()
    t, h = len(next(iter(splits.values()))), dense.shape[1]
    splits = {name: owners(dense, [w.detach() for w in shards], 0) for name, shards in splits.items()}
    colors, head_dim = rank_colors(t), h // heads
    fig = Figure(figsize=(11, 2.6))
    axes = fig.subplots(len(splits), 1, squeeze=False)[:, 0]
    for ax, (name, owner) in zip(axes, splits.items()):
        image = np.array([[colors[o] for o in owner]])
        ax.imshow(image, aspect="auto", interpolation="nearest")
        ax.set_yticks([0], [name], fontsize=9)
        ticks = [i * head_dim + (head_dim - 1) / 2 for i in range(3 * heads)]
        ax.set_xticks(ticks, [f"{'qkv'[i // heads]}{i % heads}" for i in range(3 * heads)], fontsize=8)
        for boundary in (h - 0.5, 2 * h - 0.5):
            ax.axvline(boundary, color="black", lw=1.5)
        ax.tick_params(length=0)
    axes[-1].set_xlabel("rows of the fused qkv weight [3h, h]: q, k, v, each [heads, head_dim] "
                        f"(h = {h}, {heads} heads)", fontsize=9)
    fig.suptitle(f"which rank holds each row, t = {t}: only the per-head split gives a rank whole heads of q, k "
                 "and v", fontsize=11)
    fig.tight_layout()
    return fig


REGION_COLORS = {"sequence": "#9ecae1", "tensor": "#fdae6b"}


def region(shape: tuple[int, ...], seq: int, t: int) -> str:
    """"sequence" for a [b, s/t, h] shard of the tokens, "tensor" for all s tokens with features (or heads) split."""
    return "sequence" if len(shape) == 3 and shape[1] * t == seq and t > 1 else "tensor"


def plot_regions(shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], seq: int, t: int) -> Figure:
    """A TP+SP block module by module (``shapes``: name -> (input shape, output shape) on one rank, in forward
    order), each coloured by the region its output lies in, with g where a module's input is a sequence
    shard and its output is not (all-gather), and ḡ where the reverse holds (reduce-scatter)
    (Korthikanti et al. 2022, Fig. 5)."""
    fig = Figure(figsize=(11, 2.4))
    ax = fig.subplots()
    width, gap = 1.0, 0.45
    for i, (name, (shape_in, shape_out)) in enumerate(shapes.items()):
        x = i * (width + gap)
        before, after = region(shape_in, seq, t), region(shape_out, seq, t)
        ax.add_patch(Rectangle((x, 0), width, 1, facecolor=REGION_COLORS[after], edgecolor="black", lw=0.8))
        ax.text(x + width / 2, 0.62, name.replace(".", ".\n", 1) if len(name) > 8 else name, ha="center",
                va="center", fontsize=8)
        ax.text(x + width / 2, 0.18, "×".join(map(str, shape_out)), ha="center", va="center", fontsize=7)
        if i:
            ax.annotate("", (x, 0.5), (x - gap, 0.5), arrowprops={"arrowstyle": "->", "lw": 0.8})
        if before == "sequence" and after == "tensor":
            ax.text(x - gap / 2, 1.12, "g", ha="center", fontsize=12, fontweight="bold")
        if before == "tensor" and after == "sequence":
            ax.text(x + width + gap / 2, 1.12, "ḡ", ha="center", fontsize=12, fontweight="bold")
    ax.set_xlim(-0.1, len(shapes) * (width + gap))
    ax.set_ylim(-0.35, 1.45)
    ax.axis("off")
    handles = [Rectangle((0, 0), 1, 1, facecolor=c, edgecolor="black", lw=0.8) for c in REGION_COLORS.values()]
    ax.legend(handles, [f"sequence-parallel: [b, s/{t}, h] per rank", "tensor-parallel: all s tokens, features or "
                        "heads split"], loc="lower center", ncol=2, fontsize=8, frameon=False,
              bbox_to_anchor=(0.5, -0.3))
    fig.suptitle(f"one TP+SP block on {t} ranks: each module's output on one rank (g: all-gather into a column "
                 "layer, ḡ: reduce-scatter out of a row layer)", fontsize=10)
    fig.tight_layout()
    return fig
