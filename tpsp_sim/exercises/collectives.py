"""Exercises of notebook 00: the ring all-gather and reduce-scatter, written from ``sendrecv``.

Closed forms (p ranks, nccl-tests convention; design section 4): an all-gather of an n-byte shard
sends and receives (p-1)·n bytes per rank; a reduce-scatter of an N-byte tensor (p-1)/p·N.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import solutions
from .harness import P2P, WORLD_SIZES, Exercise, check_bytes, check_calls, compare, first, randn, run_ranks

SHARD = (3, 2)  # float64: n = 48 B per rank
FULL_ROWS = 12  # reduce-scatter input [12, 3] float64: N = 288 B, divisible into 2, 3 or 4 chunks


def _ring_case(fn: Callable, p: int, inputs: list[torch.Tensor], wants: list[torch.Tensor], expected: int,
               formula: str) -> list[str]:
    def rank_fn(comm):
        return fn(inputs[comm.rank].clone(), comm)

    res = run_ranks(rank_fn, p)
    problems = first(compare(f"rank {r}'s result", out, want) for r, (out, want) in enumerate(zip(res.outputs, wants)))
    problems += check_calls(res.trace, p, "forward", allowed=P2P)
    return problems + check_bytes(res.trace, p, "forward", expected, formula, ("sent_bytes", "recv_bytes"))


def _all_gather_case(fn: Callable, p: int) -> list[str]:
    shards = [randn(*SHARD, seed=10 * p + r) for r in range(p)]
    n = shards[0].numel() * 8
    return _ring_case(fn, p, shards, [torch.cat(shards)] * p, (p - 1) * n, f"(p-1)·n = {p - 1}·{n}")


def _reduce_scatter_case(fn: Callable, p: int) -> list[str]:
    xs = [randn(FULL_ROWS, 3, seed=10 * p + r) for r in range(p)]
    total, big_n = sum(xs), xs[0].numel() * 8
    return _ring_case(fn, p, xs, list(total.chunk(p)), (p - 1) * big_n // p, f"(p-1)/p·N = {p - 1}/{p}·{big_n}")


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
