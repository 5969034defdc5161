"""Step-by-step pictures of two ring algorithms, recorded on virtual ranks (they render with no kernel).

``ring_all_reduce_states`` runs a ring all-reduce (reduce-scatter, then all-gather: 2(p-1) shifts of
one chunk) in which rank r's input is 2^r in every chunk, so every partial sum is the bitmask of the
ranks it contains; ``plot_ring_all_reduce`` draws the chunks every rank holds after each step.

``ring_attention_states`` runs ring attention's forward step by step (``ring.forward_steps``, the loop of
``ts.ring_attention``) and records, per rank and step, whose K/V block it holds, which (query, key)
pairs of the tile it computes, and how far its running output still is from dense attention;
``plot_ring_attention`` draws them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..context_parallel.attention import shard_sequence
from ..models.attention import dense_attention
from ..context_parallel.ring import forward_steps
from ..core.comm import Comm
from ..launch import run
from .collectives import rank_colors

COMPLETE = "#2e7d32"  # a chunk summed over every rank


# ---- ring all-reduce ------------------------------------------------------------------------------

@dataclass(frozen=True)
class AllReduceStep:
    """Every rank's chunks after one step: ``held[r][c]`` = bitmask of the ranks summed into chunk c on
    rank r; ``received[r]`` = the chunk rank r received in this step (None at the start)."""

    phase: str  # "start", "reduce-scatter" or "all-gather"
    held: tuple[tuple[int, ...], ...]
    received: tuple[int | None, ...]


def _all_reduce_by_steps(comm: Comm) -> list[tuple[list[int], int | None]]:
    p, r = comm.world_size, comm.rank
    chunks = [torch.tensor([2.0 ** r], dtype=torch.float64) for _ in range(p)]
    snapshots = [([int(c) for c in chunks], None)]
    shift = lambda x: comm.sendrecv(x, (r + 1) % p, (r - 1) % p)
    for s in range(p - 1):  # reduce-scatter: pass on chunk r-1-s, add ours to chunk r-2-s
        c = (r - 2 - s) % p
        chunks[c] = chunks[c] + shift(chunks[(r - 1 - s) % p])
        snapshots.append(([int(x) for x in chunks], c))
    for s in range(p - 1):  # all-gather: pass on the complete chunk r-s, receive chunk r-1-s
        c = (r - 1 - s) % p
        chunks[c] = shift(chunks[(r - s) % p])
        snapshots.append(([int(x) for x in chunks], c))
    return snapshots


def ring_all_reduce_states(world_size: int) -> list[AllReduceStep]:
    """The 2(p-1) + 1 states of a ring all-reduce on ``world_size`` virtual ranks (p <= 16)."""
    if not 2 <= world_size <= 16:
        raise ValueError(f"ring_all_reduce_states draws 2 to 16 ranks, got world_size={world_size}")
    per_rank = run(_all_reduce_by_steps, world_size=world_size).outputs
    phases = ["start"] + ["reduce-scatter"] * (world_size - 1) + ["all-gather"] * (world_size - 1)
    return [AllReduceStep(phase, tuple(tuple(per_rank[r][i][0]) for r in range(world_size)),
                          tuple(per_rank[r][i][1] for r in range(world_size))) for i, phase in enumerate(phases)]


def _draw_all_reduce_step(ax, state: AllReduceStep, index: int, fontsize: float) -> None:
    p = len(state.held)
    colors = rank_colors(p)
    for r, row in enumerate(state.held):
        for c, mask in enumerate(row):
            members = [i for i in range(p) if mask >> i & 1]
            face = COMPLETE if len(members) == p else colors[members[0]] if len(members) == 1 else \
                str(0.85 - 0.5 * len(members) / p)
            new = state.received[r] == c
            ax.add_patch(Rectangle((c, p - 1 - r), 0.94, 0.9, facecolor=face, edgecolor="black",
                                   linewidth=2.0 if new else 0.3))
            label = "all" if len(members) == p else "+".join(map(str, members))
            ax.text(c + 0.47, p - 0.55 - r, label, ha="center", va="center", fontsize=fontsize,
                    color="white" if len(members) == p else "black")
    ax.set_xlim(0, p)
    ax.set_ylim(0, p)
    ax.set_xticks([c + 0.47 for c in range(p)], [f"chunk {c}" for c in range(p)], fontsize=fontsize - 1)
    ax.set_yticks([p - 0.55 - r for r in range(p)], [f"rank {r}" for r in range(p)], fontsize=fontsize)
    ax.tick_params(length=0)
    ax.set_frame_on(False)
    ax.set_title(f"step {index}: {state.phase}" if index else "start: rank r holds 2^r", fontsize=fontsize + 1)


def plot_ring_all_reduce(world_size: int = 4, step: int | None = None) -> Figure:
    """Every step of a ring all-reduce on ``world_size`` ranks (or only ``step``, drawn large enough to
    read as one frame of a player): per rank, which ranks' inputs each chunk holds; a thick edge marks
    the chunk that arrived in that step, green a full sum."""
    states = ring_all_reduce_states(world_size)
    if step is not None:  # one frame: about 1.5 inch per chunk, labels at 12 pt
        fig = Figure(figsize=(1.5 * world_size + 1.4, 0.6 * world_size + 1.0))
        _draw_all_reduce_step(fig.subplots(), states[step], step, fontsize=12)
        fig.tight_layout()
        return fig
    columns = min(4, len(states))
    rows = -(-len(states) // columns)
    fig = Figure(figsize=(2.6 * columns, 0.45 * world_size * rows + 0.6 * rows))
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False).ravel())
    for ax, (i, state) in zip(axes, enumerate(states)):
        _draw_all_reduce_step(ax, state, i, fontsize=7)
    for ax in axes[len(states):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


# ---- ring attention -------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionStep:
    """One rank at one step: whose K/V block it holds, the tile's computed (query, key) pairs
    (``pairs[i, j]``: local query i attends to key j of the block), and max |running out - dense|."""

    block: int
    pairs: np.ndarray
    error: float


def _attention_by_steps(comm: Comm, q, k, v, want, causal: bool, layout: str) -> list[AttentionStep]:
    p, r = comm.world_size, comm.rank
    q, k, v, want = (shard_sequence(x, r, p, dim=2, layout=layout) for x in (q, k, v, want))
    n = q.shape[2]
    steps = []
    for step, (tile, out, _) in enumerate(forward_steps(q, k, v, comm, causal, layout)):
        pairs = np.zeros((n, n), dtype=bool)
        if tile is not None:
            rows, cols, masked = tile
            pairs[rows, cols] = np.tril(np.ones((n, n), dtype=bool))[rows, cols] if masked else True
        steps.append(AttentionStep((r - step) % p, pairs, float((out - want).abs().max())))
    return steps


def ring_attention_states(world_size: int = 4, tokens_per_rank: int = 4, causal: bool = True,
                          layout: str = "contiguous", seed: int = 0) -> list[list[AttentionStep]]:
    """states[rank][step] of ring attention's forward on float64 data (1 batch, 1 head, head_dim 4)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 1, world_size * tokens_per_rank, 4, generator=gen, dtype=torch.float64)
               for _ in range(3))
    want = dense_attention(q, k, v, causal=causal)
    return run(_attention_by_steps, q, k, v, want, causal, layout, world_size=world_size).outputs


def plot_ring_attention(world_size: int = 4, tokens_per_rank: int = 4, causal: bool = True,
                        layout: str = "contiguous", step: int | None = None) -> Figure:
    """One row per rank, one column per step (or only ``step``: then one panel per rank, side by side,
    large enough to read as one frame of a player): the tile of (query, key) pairs the rank computes,
    in the colour of the rank whose K/V block it holds (white: masked or skipped), and the largest
    error of its running output against dense attention after merging that tile."""
    states = ring_attention_states(world_size, tokens_per_rank, causal, layout)
    colors = rank_colors(world_size)
    title = f"ring attention, {'causal' if causal else 'non-causal'}, {layout} layout, {world_size} ranks"
    if step is None:
        fig = Figure(figsize=(1.7 * world_size + 0.8, 1.5 * world_size + 0.6))
        axes = fig.subplots(world_size, world_size, squeeze=False)
        panels = [(axes[r, t], r, t) for r in range(world_size) for t in range(world_size)]
        fontsize = 7
    else:  # one frame: a row of ranks, 2.2 inch each, labels at 11 pt
        fig = Figure(figsize=(2.2 * world_size + 0.6, 3.4))
        axes = fig.subplots(1, world_size, squeeze=False)
        panels = [(axes[0, r], r, step) for r in range(world_size)]
        fontsize = 11
        title += f": step {step}"
    for ax, r, t in panels:
        s = states[r][t]
        image = np.ones((*s.pairs.shape, 4))
        image[s.pairs] = colors[s.block]
        ax.imshow(image, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        computed = "skipped" if not s.pairs.any() else f"{int(s.pairs.sum())} pairs"
        ax.set_title(f"K/V {s.block}: {computed}\nerror {s.error:.0e}", fontsize=fontsize)
        if step is None:
            if t == 0:
                ax.set_ylabel(f"rank {r}\nqueries", fontsize=fontsize)
            if r == world_size - 1:
                ax.set_xlabel(f"step {t}: keys", fontsize=fontsize)
        else:
            ax.set_xlabel(f"rank {r}: keys", fontsize=fontsize)
            if r == 0:
                ax.set_ylabel("queries", fontsize=fontsize)
    fig.suptitle(title, fontsize=fontsize + 2)
    fig.tight_layout()
    return fig
