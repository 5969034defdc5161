"""Exercises of notebook 03: the online-softmax merge, and ring attention's forward from ``sendrecv``.

Ring attention on p ranks, non-causal, contiguous layout: every rank computes p tiles and passes
its K and V on p-1 times, so each rank sends (and receives) (p-1)·2·E·8 bytes, E = elements of its
float64 K shard ([1, 2, 3, 4]: E = 24, 384 B per shift of K and V together).
A wrong output is named when it is a known mistake: one tile missing (p-1 merged), the local K with the
received V (or the reverse), a merge that keeps one tile instead of merging.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..context_parallel.attention import attention_block, shard_sequence
from ..models.attention import dense_attention
from . import solutions
from .harness import (P2P, WORLD_SIZES, Exercise, check_bytes, check_calls, compare, first, matches, randn,
                      run_ranks)

Q_SHAPE, KV_SHAPE = (1, 2, 5, 4), (1, 2, 12, 4)  # 12 keys split into 1, 2, 3 or 4 tiles


def _merged(q: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention of ``q`` over the (K, V) blocks, merged with the reference online softmax."""
    out = lse = None
    for k, v in blocks:
        out, lse = solutions.online_softmax_merge(out, lse, *attention_block(q, k, v))
    return out


def one_tile_kept(got: torch.Tensor, q: torch.Tensor, k_tiles, v_tiles) -> str | None:
    """Name a merge whose result is one tile alone (the state replaced, or never updated)."""
    for i, (k, v) in enumerate(zip(k_tiles, v_tiles)):
        if matches(got, attention_block(q, k, v)[0]):
            which = "the last" if i == len(k_tiles) - 1 else "the first" if i == 0 else f"tile {i + 1}"
            return f"it equals {which} tile alone: the running state was replaced or kept, not merged"
    return None


def _merge_case(fn: Callable, tiles: int) -> list[str]:
    q, k, v = randn(*Q_SHAPE, seed=1), randn(*KV_SHAPE, seed=2), randn(*KV_SHAPE, seed=3)
    out = lse = None
    for i, (k_tile, v_tile) in enumerate(zip(k.chunk(tiles, 2), v.chunk(tiles, 2))):
        try:
            out, lse = fn(out, lse, *attention_block(q, k_tile, v_tile))
        except NotImplementedError:
            raise
        except Exception as error:  # noqa: BLE001 - the learner's code: say what it raised, and when
            where = "the first tile, with out=None and lse=None (it should become the state)" if i == 0 else \
                f"tile {i + 1}"
            return [f"raised {type(error).__name__} on {where}: {error}"]
    scores = (q @ k.transpose(-2, -1)) * Q_SHAPE[-1] ** -0.5
    return (compare("merged out", out, dense_attention(q, k, v),
                    explain=lambda got: one_tile_kept(got, q, k.chunk(tiles, 2), v.chunk(tiles, 2)))
            + compare("merged lse", lse, scores.logsumexp(-1)))


def ring_mistake(got: torch.Tensor, q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
                 rank: int) -> str | None:
    """Name a ring output that is a known mistake: a block of keys missing (on 2 ranks also what only the own
    block gives), or K and V from different blocks (``ks``, ``vs``: every rank's shard)."""
    p = len(ks)
    for j in range(p):
        if p > 1 and matches(got, _merged(q, [(ks[i], vs[i]) for i in range(p) if i != j])):
            return f"{p - 1} of {p} tiles merged: one block of keys is missing (rank {j}'s was never merged)"
    if matches(got, _merged(q, [(ks[rank], v) for v in vs])):
        return "the scores use this rank's own K at every step with the received V: use the K that came with the V"
    if matches(got, _merged(q, [(k, vs[rank]) for k in ks])):
        return "the received K is used with this rank's own V: use the V that came with the K"
    return None


def _ring_case(fn: Callable, p: int) -> list[str]:
    q, k, v = (randn(1, 2, 3 * p, 4, seed=10 * p + i) for i in range(3))
    want = dense_attention(q, k, v).chunk(p, 2)
    qs, ks, vs = ([shard_sequence(t, r, p, dim=2) for r in range(p)] for t in (q, k, v))

    def rank_fn(comm):
        return fn(qs[comm.rank].clone(), ks[comm.rank].clone(), vs[comm.rank].clone(), comm)

    res = run_ranks(rank_fn, p)
    problems = first(compare(f"rank {r}'s output", out, want[r], explain=lambda got, r=r: ring_mistake(got, qs[r], ks,
                                                                                                          vs, r))
                     for r, out in enumerate(res.outputs))
    problems += check_calls(res.trace, p, "forward", allowed=P2P)
    e = 2 * 3 * 4  # elements of one rank's K shard
    return problems + check_bytes(res.trace, p, "forward", (p - 1) * 2 * e * 8, f"(p-1)·2·E·8 = {p - 1}·2·{e}·8",
                                  ("sent_bytes", "recv_bytes"))


ONLINE_SOFTMAX_MERGE = Exercise(
    name="online_softmax_merge", notebook="03_ring_attention",
    task="online_softmax_merge(out, lse, block_out, block_lse) -> (out, lse); the first tile arrives with "
         "out = lse = None",
    cases=(1, 2, 3, 4), case_label="key tiles", check_case=_merge_case,
    checked="merging 1, 2, 3 or 4 key tiles gives dense attention's output and log-sum-exp.",
    solution=solutions.online_softmax_merge, solution_source=(solutions.online_softmax_merge,))

RING_ATTENTION_FORWARD = Exercise(
    name="ring_attention_forward", notebook="03_ring_attention",
    task="ring_attention_forward(q, k, v, comm): this rank's non-causal attention output over the whole sequence, "
         "passing K and V round the ring with sendrecv",
    cases=WORLD_SIZES, case_label="ranks", check_case=_ring_case,
    checked="each rank's output equals its rows of dense attention on 2, 3 and 4 ranks, with point-to-point calls "
            "only, each rank sending and receiving (p-1)·2·E·8 bytes (p-1 shifts of K and V).",
    solution=solutions.ring_attention_forward,
    solution_source=(solutions.online_softmax_merge, solutions.ring_attention_forward))
