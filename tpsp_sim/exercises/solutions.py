"""Reference solutions to the exercises, written from scratch (the package's own versions live in
core/mappings.py, context_parallel/). ``show_solution(name)`` prints one of them."""

from __future__ import annotations

import torch

from ..context_parallel.attention import attention_block
from ..core.comm import Comm


# ---- 00: collectives from point-to-point ----------------------------------------------------------

def ring_all_gather(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, in rank order, from p-1 ring shifts."""
    p, r = comm.world_size, comm.rank
    pieces = [None] * p
    pieces[r] = x
    block = x
    for step in range(1, p):  # p-1 shifts: after step s we hold the block of rank r-s
        block = comm.sendrecv(block, dst=(r + 1) % p, src=(r - 1) % p)
        pieces[(r - step) % p] = block
    return torch.cat(pieces, 0)


def ring_reduce_scatter(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Chunk ``rank`` (of p, along dim 0) of the sum of every rank's ``x``, from p-1 ring shifts.

    At step s rank r passes on its running sum of chunk r-1-s and adds its own part to the sum of
    chunk r-2-s that arrives; after p-1 steps the chunk that arrives is chunk r, summed over all p ranks.
    """
    p, r = comm.world_size, comm.rank
    chunks = x.chunk(p, 0)
    partial = chunks[(r - 1) % p]
    for step in range(p - 1):
        received = comm.sendrecv(partial, dst=(r + 1) % p, src=(r - 1) % p)
        partial = received + chunks[(r - 2 - step) % p]
    return partial


# ---- 01/02: Megatron's conjugate mappings as autograd Functions ----------------------------------

class CopyToRegion(torch.autograd.Function):
    """forward: identity, backward: all-reduce."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm, ctx.scope = comm, comm.current_scope  # the backward's call is recorded under this scope
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        with ctx.comm.replay_scope(ctx.scope):
            return ctx.comm.all_reduce(grad), None


class ReduceFromRegion(torch.autograd.Function):
    """forward: all-reduce, backward: identity."""

    @staticmethod
    def forward(ctx, x, comm):
        return comm.all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class GatherFromSequenceRegion(torch.autograd.Function):
    """forward: all-gather along the sequence dim (1), backward: reduce-scatter along it."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm, ctx.scope = comm, comm.current_scope
        return comm.all_gather(x, dim=1)

    @staticmethod
    def backward(ctx, grad):
        with ctx.comm.replay_scope(ctx.scope):
            return ctx.comm.reduce_scatter(grad, dim=1), None


class ReduceScatterToSequenceRegion(torch.autograd.Function):
    """forward: reduce-scatter along the sequence dim (1), backward: all-gather along it."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm, ctx.scope = comm, comm.current_scope
        return comm.reduce_scatter(x, dim=1)

    @staticmethod
    def backward(ctx, grad):
        with ctx.comm.replay_scope(ctx.scope):
            return ctx.comm.all_gather(grad, dim=1), None


def f(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return CopyToRegion.apply(x, comm)


def f_bar(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return ReduceFromRegion.apply(x, comm)


def g(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return GatherFromSequenceRegion.apply(x, comm)


def g_bar(x: torch.Tensor, comm: Comm) -> torch.Tensor:
    return ReduceScatterToSequenceRegion.apply(x, comm)


# ---- 03: online softmax and ring attention ------------------------------------------------------

def online_softmax_merge(out, lse, block_out, block_lse):
    """Merge a tile's (out, lse) into the running state; the first tile (state None) becomes it."""
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    out = torch.exp(lse - new_lse)[..., None] * out + torch.exp(block_lse - new_lse)[..., None] * block_out
    return out, new_lse


def ring_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Non-causal attention of this rank's queries over the whole sequence: p tiles, p-1 K/V shifts."""
    p, r = comm.world_size, comm.rank
    kv = torch.stack([k, v])  # one message per shift
    out = lse = None
    for step in range(p):
        out, lse = online_softmax_merge(out, lse, *attention_block(q, kv[0], kv[1]))  # the block of rank r-step
        if step < p - 1:
            kv = comm.sendrecv(kv, dst=(r + 1) % p, src=(r - 1) % p)
    return out
