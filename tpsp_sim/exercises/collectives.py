"""Exercises of notebook 00: the ring all-gather and reduce-scatter, written from ``sendrecv``.

Closed forms (p ranks, nccl-tests convention; design section 4): an all-gather of an n-byte shard
sends and receives (p-1)·n bytes per rank; a reduce-scatter of an N-byte tensor (p-1)/p·N.
A wrong result is named when it is a known mistake: the right shards in the wrong order (or one
missing), the sum's chunk of another rank (a ring that ends chunks off), one rank's part missing.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import solutions
from .harness import (P2P, WORLD_SIZES, Exercise, check_bytes, check_calls, compare, first, matches, randn,
                      run_ranks)

SHARD = (3, 2)  # float64: n = 48 B per rank
FULL_ROWS = 12  # reduce-scatter input [12, 3] float64: N = 288 B, divisible into 2, 3 or 4 chunks


def _ring_case(fn: Callable, p: int, inputs: list[torch.Tensor], wants: list[torch.Tensor], expected: int,
               formula: str, explain: Callable[[torch.Tensor, int], str | None]) -> list[str]:
    def rank_fn(comm):
        return fn(inputs[comm.rank].clone(), comm)

    res = run_ranks(rank_fn, p)
    problems = first(compare(f"rank {r}'s result", out, want, explain=lambda got, r=r: explain(got, r))
                     for r, (out, want) in enumerate(zip(res.outputs, wants)))
    problems += check_calls(res.trace, p, "forward", allowed=P2P)
    return problems + check_bytes(res.trace, p, "forward", expected, formula, ("sent_bytes", "recv_bytes"))


def shards_held(got: torch.Tensor, shards: list[torch.Tensor], rank: int) -> str | None:
    """Name an all-gather result made of the right shards in the wrong order (or with one missing)."""
    found = [next((i for i, s in enumerate(shards) if matches(block, s)), None) for block in got.chunk(len(shards))]
    if None in found:
        return None
    if sorted(found) == list(range(len(shards))):
        return f"every shard is present, in the wrong place: rank {rank} holds {found}"
    missing = sorted(set(range(len(shards))) - set(found))
    return f"rank {rank} holds shards {found}: shard {', '.join(map(str, missing))} missing"


def chunk_held(got: torch.Tensor, inputs: list[torch.Tensor], rank: int) -> str | None:
    """Name a reduce-scatter result that is another rank's chunk of the sum, or the sum without one rank."""
    p, total = len(inputs), sum(inputs)
    for c, chunk in enumerate(total.chunk(p)):
        if matches(got, chunk):
            off = min((c - rank) % p, (rank - c) % p)
            return (f"rank {rank} holds chunk {c} of the sum, not chunk {rank}: the ring ends {off} chunk"
                    f"{'s' if off > 1 else ''} off")
    for j in range(p):
        if matches(got, (total - inputs[j]).chunk(p)[rank]):
            return f"chunk {rank} summed over p-1 ranks: rank {j}'s part is missing"
    return None


def _all_gather_case(fn: Callable, p: int) -> list[str]:
    shards = [randn(*SHARD, seed=10 * p + r) for r in range(p)]
    n = shards[0].numel() * 8
    return _ring_case(fn, p, shards, [torch.cat(shards)] * p, (p - 1) * n, f"(p-1)·n = {p - 1}·{n}",
                      lambda got, r: shards_held(got, shards, r))


def _reduce_scatter_case(fn: Callable, p: int) -> list[str]:
    xs = [randn(FULL_ROWS, 3, seed=10 * p + r) for r in range(p)]
    total, big_n = sum(xs), xs[0].numel() * 8
    return _ring_case(fn, p, xs, list(total.chunk(p)), (p - 1) * big_n // p, f"(p-1)/p·N = {p - 1}/{p}·{big_n}",
                      lambda got, r: chunk_held(got, xs, r))


RING_ALL_GATHER = Exercise(
    name="ring_all_gather", notebook="00_collectives",
    task="ring_all_gather(x, comm): every rank's x concatenated along dim 0 in rank order, using only sendrecv",
    cases=WORLD_SIZES, case_label="ranks", check_case=_all_gather_case,
    checked="the result equals torch.cat of every rank's shard on 2, 3 and 4 ranks, with point-to-point calls only, "
            "each rank sending and receiving (p-1)·n bytes.",
    solution=solutions.ring_all_gather, solution_source=(solutions.ring_all_gather,))

RING_REDUCE_SCATTER = Exercise(
    name="ring_reduce_scatter", notebook="00_collectives",
    task="ring_reduce_scatter(x, comm): chunk `rank` (dim 0) of the sum of every rank's x, using only sendrecv",
    cases=WORLD_SIZES, case_label="ranks", check_case=_reduce_scatter_case,
    checked="the result equals chunk r of the sum on 2, 3 and 4 ranks, with point-to-point calls only, each rank "
            "sending and receiving (p-1)/p·N bytes.",
    solution=solutions.ring_reduce_scatter, solution_source=(solutions.ring_reduce_scatter,))
