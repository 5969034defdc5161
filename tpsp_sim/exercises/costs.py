"""The puzzle of notebook 04: choose the block (tokens per rank) that hides ring attention's transfers.

    from tpsp_sim.exercises.costs import check, show_solution
    check("ring_block_size", block_size)   # ✓, or how far from the target: exposed time, or tokens to spare

``block_size(hw, n_heads, head_dim)`` returns c, the tokens per rank of a non-causal bfloat16 ring
attention forward on ``hw`` (a one-link ``ts.cost.Hardware``), every head with its own K and V. The
target is the **smallest** c whose ring exposes nothing on the timeline (``ts.timeline``), latency
included. Each ring step computes S = QKᵀ and P·V, 4·H·c²·d FLOPs, while the next K and V block of
H·2·c·d elements (2 bytes) travels: hidden when

    4·H·d·c² / F ≥ α + 4·H·d·c / B,

whose smallest integer solution is above Liu et al.'s c = F/B by the latency's share. The checker
runs the learner's c on p = 2 and 4 virtual ranks (meta tensors: shapes only) on three links.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..analysis.cluster import Cluster, cluster
from ..analysis.cost import format_seconds
from ..analysis.replay import timeline
from ..context_parallel.ring import ring_attention
from ..launch import run
from .harness import Exercise
from .targets import puzzle_set

LINKS = ("a100-nvlink", "ib-ndr", "pcie-gen4")  # keys of ts.cost.PRESETS
HEADS, HEAD_DIM = 8, 128
SPARE = 0.02  # an answer may exceed the smallest hiding block by this fraction


def exposed(hw: Cluster | str, c: int, p: int, n_heads: int = HEADS, head_dim: int = HEAD_DIM) -> float:
    """Seconds the busiest rank waits on the K/V ring in one forward of c tokens per rank on ``p`` ranks."""
    def forward(comm):
        q, k, v = (torch.empty(1, n_heads, c, head_dim, dtype=torch.bfloat16, device="meta") for _ in range(3))
        ring_attention(q, k, v, comm)

    tl = timeline(run(forward, world_size=p, count_flops=True).trace, hw)
    return max(tl.exposed(r) for r in tl.ranks)


def block_size(hw: Cluster, n_heads: int, head_dim: int) -> int:
    """Reference: the smallest c with 4·H·d·c²/F ≥ α + 4·H·d·c/B (the positive root of the quadratic, rounded up)."""
    a = 4 * n_heads * head_dim / hw.peak_flops            # compute of one step: a·c²
    b = 4 * n_heads * head_dim / hw.link_bandwidth        # bytes of one K/V block over B: b·c
    root = (b + math.sqrt(b * b + 4 * a * hw.latency)) / (2 * a)
    c = math.ceil(root)
    return c - 1 if a * (c - 1) ** 2 >= hw.latency + b * (c - 1) else c   # guard the rounding of the root


def _block_case(fn: Callable, p: int) -> list[str]:
    for key in LINKS:
        hw = cluster(key)
        got = fn(hw, HEADS, HEAD_DIM)
        if isinstance(got, bool) or not isinstance(got, int) or got < 1:
            return [f"{hw.name}: returned {got!r}, not a positive int (tokens per rank)"]
        best = block_size(hw, HEADS, HEAD_DIM)
        waited = exposed(hw, got, p)
        if waited > 1e-12:
            return [f"{hw.name}: c = {got:,} tokens per rank leaves {format_seconds(waited)} exposed per forward "
                    f"({format_seconds(waited / (p - 1))} per shift): {best - got:,} tokens ({(best - got) / best:.1%}) "
                    f"short of the smallest block that hides the ring"
                    + (f" — F/B = {hw.peak_flops / hw.link_bandwidth:,.0f} leaves out the latency α = "
                       f"{format_seconds(hw.latency)} of every transfer" if got >= hw.peak_flops / hw.link_bandwidth - 1
                       else "")]
        if got > best * (1 + SPARE):
            return [f"{hw.name}: c = {got:,} hides the ring, but so does {best:,}: {got / best:.2f} × the smallest "
                    f"block, a sequence of {p * got:,} tokens where {p * best:,} would do"]
    return []


RING_BLOCK_SIZE = Exercise(
    name="ring_block_size", notebook="04_communication_costs",
    task="block_size(hw, n_heads, head_dim) -> the fewest tokens per rank whose ring transfers hide behind compute",
    cases=(2, 4), case_label="ranks", check_case=_block_case,
    checked=f"on {', '.join(LINKS)}, {HEADS} heads of {HEAD_DIM}, bf16: the ring's forward exposes nothing on the "
            f"timeline, and the block is within {SPARE:.0%} of the smallest that does, on 2 and 4 ranks.",
    solution=block_size, solution_source=(block_size,))

PUZZLES, check, show_solution = puzzle_set(RING_BLOCK_SIZE)
