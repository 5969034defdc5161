"""Ring attention (Liu et al. 2023): each rank keeps its queries and passes K/V blocks around a ring.

On p ranks every rank computes p tiles — its own K/V block at step 0, then the block of rank
r-1, r-2, ... — merging their (out, lse) with the online softmax (attention.py). The next K/V shift
is posted *before* the current tile is computed and waited on after it, so transfer overlaps compute:
p steps, p-1 shifts.

Causal, contiguous layout: step 0 is the masked diagonal tile, blocks from earlier ranks are full,
blocks from later ranks are skipped — rank r computes r+1 tiles, so the last rank does p times the
work of the first. Zigzag layout (rank r holds chunks r and 2p-1-r of 2p): a block from an earlier
rank is seen in full by our queries but only through its first chunk; a block from a later rank
is seen only by our second chunk, through both of its chunks — half a tile for every rank at every
step after the diagonal.

Backward (an autograd Function, not autograd through the loop): a second ring passes K/V round
again and carries each block's dK/dV accumulator with it; tiles are recomputed from the saved
*global* lse. Per rank, with p >= 2 and E = batch·kv_heads·seq_local·head_dim elements per K or V:

    forward   p-1 sends of K and V stacked:  (p-1)·2E·s_in bytes
    backward  p-1 sends of K and V stacked:  (p-1)·2E·s_in bytes
              p   sends of dK and dV stacked: p·2E·s_acc bytes (the last one brings them home)

s_in is the input's element size; s_acc that of the accumulation dtype (4 for 16-bit inputs, else
s_in). One rank (p = 1) sends nothing. Receives mirror sends. All calls are recorded under the scope
"ring_attn"; backward's with phase "backward".
"""

from __future__ import annotations

from typing import Iterator

import torch

from .attention import attention_block, attention_block_backward, check_shard, online_softmax_merge
from .kind import AttentionKind, LocalShape, diagonal_excess, no_extra_memory, ring_problem
from ..core.autograd import CommFunction
from ..core.comm import Comm

ALL = slice(None)


class _Shift:
    """One ring shift of ``x``: send to rank+1, receive from rank-1; ``wait()`` returns what arrived.

    Even ranks post the send first and odd ranks the receive first (Megatron's p2p order): where both
    directions share one NCCL stream (p = 2, one peer), two ranks that both sent first would each wait
    on a receive queued behind the other's send — a hang for messages larger than NCCL's buffers.
    """

    def __init__(self, comm: Comm, x: torch.Tensor) -> None:
        nxt, prev = (comm.rank + 1) % comm.world_size, (comm.rank - 1) % comm.world_size
        if comm.rank % 2 == 0:
            self.send, self.recv = comm.isend(x, nxt), comm.irecv(x, prev)
        else:
            self.recv, self.send = comm.irecv(x, prev), comm.isend(x, nxt)

    def wait(self) -> torch.Tensor:
        self.send.wait()
        return self.recv.wait()


def _tile(step: int, rank: int, world_size: int, n: int, causal: bool, layout: str):
    """What rank ``rank`` computes at ``step`` on the K/V block of rank (rank - step) mod p:
    (query rows, key rows, masked diagonal?) as slices of the local sequence, or None to skip."""
    if not causal:
        return ALL, ALL, False
    if step == 0:
        return ALL, ALL, True
    earlier = (rank - step) % world_size < rank
    if layout == "contiguous":
        return (ALL, ALL, False) if earlier else None
    half = n // 2
    return (ALL, slice(0, half), False) if earlier else (slice(half, n), ALL, False)


def forward_steps(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, causal: bool,
                  layout: str) -> Iterator[tuple[tuple | None, torch.Tensor, torch.Tensor]]:
    """The forward ring one step at a time: yields (tile, out, lse) once step's tile is merged
    (out and lse are updated in place, in the accumulation dtype; ``tile`` as ``_tile`` gives it).
    The next shift is in flight while the tile is computed and while the caller looks at the step."""
    p, r, n = comm.world_size, comm.rank, q.shape[2]
    kv = torch.stack([k, v])  # one message per shift
    out = lse = None
    for step in range(p):
        shift = _Shift(comm, kv) if step < p - 1 else None
        tile = _tile(step, r, p, n, causal, layout)
        if tile is not None:
            rows, cols, masked = tile
            block = attention_block(q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], causal=masked)
            if out is None:  # step 0 covers every row
                out, lse = block
            else:
                out[:, :, rows], lse[:, :, rows] = online_softmax_merge(out[:, :, rows], lse[:, :, rows], *block)
        yield tile, out, lse
        if shift is not None:
            kv = shift.wait()


class _RingAttention(CommFunction):
    """forward: ring of K/V blocks with online softmax; backward: ring of K/V and dK/dV with the global lse."""

    @staticmethod
    def forward(ctx, q, k, v, comm, causal, layout):
        *_, (_, out, lse) = forward_steps(q, k, v, comm, causal, layout)  # run the ring, keep its last state
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.layout = causal, layout
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        comm = ctx.comm
        p, r, n, acc = comm.world_size, comm.rank, q.shape[2], lse.dtype
        delta = (dout.to(acc) * out.to(acc)).sum(-1)
        dq = torch.zeros_like(q, dtype=acc)
        kv = torch.stack([k, v])
        carried = None  # the shift bringing the dK/dV accumulator of the block we hold next
        for step in range(p):
            shift = _Shift(comm, kv) if step < p - 1 else None
            dkv = torch.zeros_like(kv, dtype=acc)
            tile = _tile(step, r, p, n, ctx.causal, ctx.layout)
            if tile is not None:
                rows, cols, masked = tile
                dq_tile, dk_tile, dv_tile = attention_block_backward(
                    q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], dout[:, :, rows],
                    lse[:, :, rows], delta[:, :, rows], causal=masked)
                dq[:, :, rows] += dq_tile
                dkv[0][:, :, cols], dkv[1][:, :, cols] = dk_tile, dv_tile
            if carried is not None:
                dkv += carried.wait()
            carried = _Shift(comm, dkv) if p > 1 else None
            if shift is not None:
                kv = shift.wait()
        if carried is not None:
            dkv = carried.wait()  # our own block's dK/dV, home after p shifts
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm: Comm, *, causal: bool = False,
                   layout: str = "contiguous") -> torch.Tensor:
    """This rank's attention output for its sequence shard ``q, k, v`` ([batch, heads, seq_local, head_dim];
    K/V may have fewer heads), equal to dense attention over the full sequence. ``layout`` says how the
    sequence was sharded (``ts.shard_sequence``); "zigzag" balances causal work across ranks."""
    check_shard(q, k, v, comm.rank, comm.world_size, layout, "ring_attention")
    with comm.scope("ring_attn"):
        return _RingAttention.apply(q, k, v, comm, causal, layout)


def ring_wire_bytes(shape: LocalShape, r: int) -> tuple[int, int]:
    """(forward, backward) bytes one rank sends in a ring of r ranks over its K/V (module docstring)."""
    if r == 1:
        return 0, 0
    kv = 2 * shape.kv_elems
    return (r - 1) * kv * shape.elem, (r - 1) * kv * shape.elem + r * kv * shape.acc


def _attend(q, k, v, *, ulysses, ring, causal, layout):
    return ring_attention(q, k, v, ring, causal=causal, layout=layout)


KIND = AttentionKind(
    name="ring",
    summary="ring attention (Liu et al. 2023): K/V blocks go round the ring, p steps, each shift hidden behind a tile",
    groups=("ring",),
    attend=_attend,
    wire_bytes=lambda shape, u, r: dict(zip((("ring", "forward"), ("ring", "backward")), ring_wire_bytes(shape, r))),
    causal_excess=lambda shape, u, r, layout: diagonal_excess(shape, shape.tokens, shape.q_heads),
    extra_saved_bytes=no_extra_memory,
    problem=lambda shape, u, r, layout: ring_problem(shape, layout),
)
