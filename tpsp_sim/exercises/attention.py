"""Exercises of notebook 03: the online-softmax merge, and ring attention's forward from ``sendrecv``.

Ring attention on p ranks, non-causal, contiguous layout: every rank computes p tiles and passes
its K and V on p-1 times, so each rank sends (and receives) (p-1)·2·E·8 bytes, E = elements of its
float64 K shard ([1, 2, 3, 4]: E = 24, 384 B per shift of K and V together).
"""

from __future__ import annotations

from typing import Callable

from ..context_parallel.attention import attention_block, shard_sequence
from ..models.attention import dense_attention
from . import solutions
from .harness import P2P, WORLD_SIZES, Exercise, check_bytes, check_calls, compare, first, randn, run_ranks

Q_SHAPE, KV_SHAPE = (1, 2, 5, 4), (1, 2, 12, 4)  # 12 keys split into 1, 2, 3 or 4 tiles


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
    return compare("merged out", out, dense_attention(q, k, v)) + compare("merged lse", lse, scores.logsumexp(-1))


def _ring_case(fn: Callable, p: int) -> list[str]:
    q, k, v = (randn(1, 2, 3 * p, 4, seed=10 * p + i) for i in range(3))
    want = dense_attention(q, k, v).chunk(p, 2)

    def rank_fn(comm):
        return fn(*(shard_sequence(t, comm.rank, p, dim=2) for t in (q, k, v)), comm)

    res = run_ranks(rank_fn, p)
    problems = first(compare(f"rank {r}'s output", out, want[r]) for r, out in enumerate(res.outputs))
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
