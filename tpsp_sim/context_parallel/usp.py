"""USP, unified sequence parallelism (Fang & Zhao 2024): Ulysses inside a group, ring attention across groups.

The cp = u·r ranks of a context-parallel group form a u × r grid: ``ulysses`` (u ranks, typically one
node) and ``ring`` (r ranks, across nodes). The sequence is cut over the ring first (``layout``:
contiguous, or zigzag to balance causal work), then each ring piece contiguously over the Ulysses
group (``usp_shard_sequence``). Attention is Ulysses' all-to-all over heads inside ``ulysses`` — after
it a rank holds its ring piece of the sequence for heads/u heads — then ring attention over ``ring``
on that piece, then the all-to-all back. u = 1 is ring attention, r = 1 is Ulysses; in between, the
heads limit of Ulysses (heads % u == 0) applies to u only, and the ring takes r steps instead of cp.

Bytes per rank, with E_q = b·h·(s/cp)·d and E_kv = b·h_kv·(s/cp)·d elements of this rank's q and of
its k (= v), s_in the input's element size and s_acc the accumulation one (ring.py):

    ulysses  forward   4 all-to-alls (q, k, v, out):   (u-1)/u · (2E_q + 2E_kv) · s_in
             backward  4 all-to-alls (dout, dq, dk, dv): the same
    ring     forward   (r-1) shifts of K and V:         (r-1) · 2E_kv · s_in
             backward  (r-1) shifts of K and V:         (r-1) · 2E_kv · s_in
                       r shifts of dK and dV:           r · 2E_kv · s_acc              (none when r = 1)

The ring moves the same E_kv as plain ring attention on cp ranks would per step (h_kv/u heads of s/r
tokens), but r - 1 times instead of cp - 1. Calls are recorded under "usp_attn" (the ring's inside,
under "usp_attn/ring_attn"), each on its own comm, so a mesh puts them on their own axes.
"""

from __future__ import annotations

import torch

from .attention import check_qkv, shard_sequence, unshard_sequence
from .kind import AttentionKind, LocalShape, diagonal_excess, heads_problem, no_extra_memory, ring_problem
from .ring import ring_attention, ring_wire_bytes
from .ulysses import HEADS, SEQ, ulysses_wire_bytes
from ..core.comm import Comm
from ..core.mappings import all_to_all


def usp_shard_sequence(x: torch.Tensor, ulysses_rank: int, ulysses_size: int, ring_rank: int, ring_size: int, *,
                       dim: int, layout: str = "contiguous") -> torch.Tensor:
    """This rank's piece of the sequence dim ``dim``: piece ``ulysses_rank`` (contiguous) of ring shard
    ``ring_rank`` (``layout``), so that the Ulysses all-to-all rebuilds exactly the ring shard."""
    ring_piece = shard_sequence(x, ring_rank, ring_size, dim=dim, layout=layout)
    return shard_sequence(ring_piece, ulysses_rank, ulysses_size, dim=dim)


def usp_unshard_sequence(pieces: list[torch.Tensor], ulysses_size: int, *, dim: int,
                         layout: str = "contiguous") -> torch.Tensor:
    """The full sequence from every rank's piece, in ring-major order (rank ring·u + ulysses): the inverse
    of ``usp_shard_sequence``."""
    if len(pieces) % ulysses_size:
        raise ValueError(f"usp_unshard_sequence: {len(pieces)} pieces do not form ring groups of {ulysses_size}")
    ring_pieces = [torch.cat(pieces[i:i + ulysses_size], dim) for i in range(0, len(pieces), ulysses_size)]
    return unshard_sequence(ring_pieces, dim=dim, layout=layout)


def usp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ulysses: Comm, ring: Comm, *,
                  causal: bool = False, layout: str = "contiguous") -> torch.Tensor:
    """This rank's attention output for its piece ``q, k, v`` ([b, heads, s/cp, d], from
    ``usp_shard_sequence``; K/V may have fewer heads), equal to dense attention over the full sequence."""
    check_qkv(q, k, v, f"rank {ring.rank} of the ring, {ulysses.rank} of the Ulysses group: usp_attention")
    u = ulysses.world_size
    if q.shape[HEADS] % u or k.shape[HEADS] % u:
        raise ValueError(f"rank {ulysses.rank} of the Ulysses group: usp_attention needs heads divisible by its size "
                         f"u={u}; got {q.shape[HEADS]} query heads and {k.shape[HEADS]} key/value heads")
    with ulysses.scope("usp_attn"):
        q, k, v = (all_to_all(x, ulysses, scatter_dim=HEADS, gather_dim=SEQ) for x in (q, k, v))
        out = ring_attention(q, k, v, ring, causal=causal, layout=layout)
        return all_to_all(out, ulysses, scatter_dim=SEQ, gather_dim=HEADS)


def _wire_bytes(shape: LocalShape, u: int, r: int) -> dict[tuple[str, str], int]:
    """Ulysses on u over the rank's piece, then a ring on r over K/V of kv_heads/u heads and u·tokens
    tokens: the same kv_elems (module docstring)."""
    ring_forward, ring_backward = ring_wire_bytes(shape, r)
    a2a = ulysses_wire_bytes(shape, u)
    return {("ulysses", "forward"): a2a, ("ulysses", "backward"): a2a,
            ("ring", "forward"): ring_forward, ("ring", "backward"): ring_backward}


def _attend(q, k, v, *, ulysses, ring, causal, layout):
    return usp_attention(q, k, v, ulysses, ring, causal=causal, layout=layout)


KIND = AttentionKind(
    name="usp",
    summary="USP (Fang & Zhao 2024): Ulysses inside a group of u ranks, ring attention across r groups, u·r = cp",
    groups=("ulysses", "ring"),
    attend=_attend,
    wire_bytes=_wire_bytes,
    causal_excess=lambda shape, u, r, layout: diagonal_excess(shape, u * shape.tokens, shape.q_heads // u),
    extra_saved_bytes=no_extra_memory,
    problem=lambda shape, u, r, layout: heads_problem(shape, u) or ring_problem(shape, layout, u * shape.tokens),
)
