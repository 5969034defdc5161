"""All-gather context parallelism (Llama 3, Dubey et al. 2024, §3.3.2): gather K/V, keep the queries.

Each of the p ranks holds its shard of the sequence (zigzag: chunks r and 2p-1-r of 2p, which
balances causal work; or contiguous). It all-gathers K and V over the group, so every rank holds the
whole sequence's keys and values, and computes attention for its own queries only. Llama 3 chose this
over a ring: K/V are small under grouped-query attention, so one all-gather is cheap and easy to
overlap, and it handles any attention mask. Causal, a query chunk at global chunk index g sees the
full tiles of keys [0, g·c) and the masked diagonal tile [g·c, (g+1)·c) (c tokens per chunk): two
tiles, merged with the online softmax.

Backward (an autograd Function): every rank computes dK/dV for the whole sequence from its queries
(recomputing tiles from the saved lse, FlashAttention-2's Alg. 2) and a reduce-scatter sums them
over the group and hands each rank its own shard. Per rank, with E = batch·kv_heads·seq_local·head_dim
elements per K or V, s_in the input's element size and s_acc the accumulation one (ring.py):

    forward   one all_gather of K and V stacked:          (p-1)·2E·s_in bytes
    backward  one reduce_scatter of dK and dV stacked:    (p-1)·2E·s_acc bytes

and the gathered K/V, 2pE elements, is kept for backward: 2(p-1)E·s_in bytes more than a ring
keeps (``ts.context_parallel.registry``'s memory entry). All calls are recorded under "allgather_attn".
"""

from __future__ import annotations

import torch

from .attention import (attention_block, attention_block_backward, check_shard, online_softmax_merge, shard_sequence,
                        unshard_sequence)
from .kind import AttentionKind, LocalShape, diagonal_excess, ring_problem
from ..core.autograd import CommFunction
from ..core.comm import Comm

SEQ = 3  # of the stacked [2, batch, heads, seq, head_dim] K/V


def _chunks(rank: int, world_size: int, n: int, layout: str) -> list[tuple[slice, int]]:
    """(local rows, global chunk index) of each chunk this rank holds, chunks of c = n / pieces tokens."""
    if layout == "contiguous":
        return [(slice(0, n), rank)]
    half = n // 2
    return [(slice(0, half), rank), (slice(half, n), 2 * world_size - 1 - rank)]


def _tiles(rows: slice, chunk: int, c: int, causal: bool) -> list[tuple[slice, slice, bool]]:
    """(query rows, key columns of the full sequence, masked diagonal?) of one query chunk."""
    if not causal:
        return [(rows, slice(None), False)]
    prefix = [(rows, slice(0, chunk * c), False)] if chunk else []
    return prefix + [(rows, slice(chunk * c, (chunk + 1) * c), True)]


class _AllGatherAttention(CommFunction):
    """forward: all-gather K/V, attend with local queries; backward: reduce-scatter dK/dV."""

    @staticmethod
    def forward(ctx, q, k, v, comm, causal, layout):
        p, n = comm.world_size, q.shape[2]
        gathered = comm.all_gather(torch.stack([k, v]), dim=SEQ)  # rank-major shards
        kv = unshard_sequence(list(gathered.chunk(p, SEQ)), dim=SEQ, layout=layout)  # natural order
        chunks = _chunks(comm.rank, p, n, layout)
        c = n // len(chunks)
        outs, lses, tiles = [], [], []
        for rows, g in chunks:  # in local order, so the chunks' rows concatenate to the shard
            out = lse = None
            for tile in _tiles(rows, g, c, causal):
                _, cols, masked = tile
                block = attention_block(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], causal=masked)
                out, lse = online_softmax_merge(out, lse, *block)
                tiles.append(tile)
            outs.append(out)
            lses.append(lse)
        out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.causal, ctx.layout, ctx.tiles = causal, layout, tiles
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, kv, out, lse = ctx.saved_tensors
        comm, acc = ctx.comm, lse.dtype
        # 1. delta = rowsum(dO ∘ O), the softmax's share of every row (FlashAttention-2, Alg. 2)
        delta = (dout.to(acc) * out).sum(-1)
        # 2. each tile's gradients from the global lse: dQ for our rows, dK/dV for the full sequence
        dq = torch.zeros_like(q, dtype=acc)
        dkv = torch.zeros_like(kv, dtype=acc)
        for rows, cols, masked in ctx.tiles:
            dq_tile, dk_tile, dv_tile = attention_block_backward(
                q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], dout[:, :, rows], lse[:, :, rows],
                delta[:, :, rows], causal=masked)
            dq[:, :, rows] += dq_tile
            dkv[0][:, :, cols] += dk_tile
            dkv[1][:, :, cols] += dv_tile
        # 3. back to rank-major shards, summed over the group: each rank receives its own shard's dK/dV
        p = comm.world_size
        shards = [shard_sequence(dkv, r, p, dim=SEQ, layout=ctx.layout) for r in range(p)]
        dkv = comm.reduce_scatter(torch.cat(shards, SEQ), dim=SEQ)
        return dq.to(q.dtype), dkv[0].to(q.dtype), dkv[1].to(q.dtype), None, None, None


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, *, causal: bool = False,
                        layout: str = "zigzag") -> torch.Tensor:
    """This rank's attention output for its sequence shard ``q, k, v`` ([batch, heads, seq_local, head_dim];
    K/V may have fewer heads), equal to dense attention over the full sequence; ``layout`` says how the
    sequence was sharded (``ts.shard_sequence``)."""
    check_shard(q, k, v, comm.rank, comm.world_size, layout, "allgather_attention")
    with comm.scope("allgather_attn"):
        return _AllGatherAttention.apply(q, k, v, comm, causal, layout)


def _wire_bytes(shape: LocalShape, u: int, r: int) -> dict[tuple[str, str], int]:
    kv = 2 * shape.kv_elems
    return {("ring", "forward"): (r - 1) * kv * shape.elem, ("ring", "backward"): (r - 1) * kv * shape.acc}


def _causal_excess(shape: LocalShape, u: int, r: int, layout: str) -> tuple[float, float]:
    """Zigzag: two diagonal tiles of tokens/2 (each computed whole, half masked), on one rank too; contiguous:
    one of tokens."""
    if layout == "zigzag":
        return diagonal_excess(shape, shape.tokens // 2, shape.q_heads, diagonals=2)
    return diagonal_excess(shape, shape.tokens, shape.q_heads)


def _attend(q, k, v, *, ulysses, ring, causal, layout):
    return allgather_attention(q, k, v, ring, causal=causal, layout=layout)


KIND = AttentionKind(
    name="allgather",
    summary="all-gather K/V (Llama 3, Dubey et al. 2024 §3.3.2): gather K/V once, attend with local queries, "
            "reduce-scatter dK/dV",
    groups=("ring",),
    attend=_attend,
    wire_bytes=_wire_bytes,
    causal_excess=_causal_excess,
    extra_saved_bytes=lambda shape, u, r: 2 * (r - 1) * shape.kv_elems * shape.elem,  # the gathered K/V, kept
    problem=lambda shape, u, r, layout: ring_problem(shape, layout),
)
