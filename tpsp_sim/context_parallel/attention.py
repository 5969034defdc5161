"""Attention one tile at a time: the idea that ring attention distributes.

Shapes are ``[batch, heads, seq, head_dim]``; K and V may have fewer heads than Q (grouped-query
attention: query head i uses K/V head i // (heads / kv_heads)). A tile returns its output *and* its
log-sum-exp ``lse`` per query row; two tiles over different keys merge exactly (online softmax,
Milakov & Gimelshein 2018; the form ring-flash-attention uses):

    lse' = logaddexp(lse_a, lse_b),   out' = exp(lse_a - lse')·out_a + exp(lse_b - lse')·out_b

Tiles are computed and merged in float32 when the inputs are 16-bit (in the input dtype otherwise).
``shard_sequence`` / ``unshard_sequence`` move between a full tensor and the per-rank pieces of the
"contiguous" layout (rank r holds chunk r of p) or the "zigzag" one (chunks r and 2p-1-r of 2p).
``sequence_positions`` gives the global positions of a rank's tokens in either layout (for RoPE).
"""

from __future__ import annotations

import torch

from ..core.flops import shapes_only
from ..models.attention import acc_dtype

LAYOUTS = ("contiguous", "zigzag")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, where: str) -> None:
    """ValueError (prefixed with ``where``) unless q, k, v are [b, h, n, d], [b, h_kv, n, d] twice, h % h_kv == 0."""
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"{where}: q, k, v must be [batch, heads, seq, head_dim] with k and v of one shape; "
                         f"got {shapes}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"{where}: q, k, v must agree on batch, seq and head_dim; got {shapes}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{where}: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads; "
                         f"got {shapes}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"{where}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _tile_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v in the accumulation dtype, with each K/V head repeated for its group of query heads."""
    dtype, group = acc_dtype(q.dtype), q.shape[1] // k.shape[1]
    if group == 1:  # repeat_interleave copies even then, and costs more than the tile's matmuls on small tiles
        return q.to(dtype), k.to(dtype), v.to(dtype)
    return q.to(dtype), k.to(dtype).repeat_interleave(group, 1), v.to(dtype).repeat_interleave(group, 1)


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """S = q kᵀ / sqrt(d); ``causal`` masks the upper triangle of a diagonal (square) tile."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        n, m = scores.shape[-2:]
        if n != m:
            raise ValueError(f"a causal tile must be square (a diagonal block), got {n} queries x {m} keys")
        scores = scores.masked_fill(torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores


@shapes_only
def attention_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile: (out, lse) with out = softmax(S) v, lse = log Σ_j exp(S_ij), S = q kᵀ / sqrt(d).

    Computed as FlashAttention does (Dao 2023, Alg. 1): m = max_j S_ij, P = exp(S - m), l = Σ_j P_ij,
    out = P v / l, lse = m + log l (a masked row always keeps its diagonal key, so m is finite).
    Explicit matmuls, so ``tpsp_sim.flops.FlopCounter`` counts the tile's 4·n·m·d FLOPs per head.
    """
    q, k, v = _tile_inputs(q, k, v)
    scores = _scores(q, k, causal)
    row_max = scores.amax(-1, keepdim=True)
    probs = torch.exp(scores - row_max)
    row_sum = probs.sum(-1, keepdim=True)
    return (probs @ v) / row_sum, (row_max + row_sum.log()).squeeze(-1)


@shapes_only
def attention_block_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
                             lse: torch.Tensor, delta: torch.Tensor, *,
                             causal: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one tile, recomputed from the *global* lse (FlashAttention-2, Dao 2023, Alg. 2).

    P = exp(S - lse) is the tile's share of the full softmax, so with delta = rowsum(dO∘O):
    dV = Pᵀ dO, dS = P∘(dO Vᵀ - delta), dQ = dS K / sqrt(d), dK = dSᵀ Q / sqrt(d).
    Returns (dq, dk, dv) in the accumulation dtype; dk, dv summed over each K/V head's query heads.
    """
    kv_heads = k.shape[1]
    q, k, v = _tile_inputs(q, k, v)
    dout = dout.to(q.dtype)
    probs = torch.exp(_scores(q, k, causal) - lse[..., None])
    dv = probs.transpose(-2, -1) @ dout
    ds = probs * (dout @ v.transpose(-2, -1) - delta[..., None]) * q.shape[-1] ** -0.5
    dq, dk = ds @ k, ds.transpose(-2, -1) @ q
    b, h, m, d = dk.shape
    return dq, dk.view(b, kv_heads, h // kv_heads, m, d).sum(2), dv.view(b, kv_heads, h // kv_heads, m, d).sum(2)


@shapes_only
def online_softmax_merge(out: torch.Tensor | None, lse: torch.Tensor | None, block_out: torch.Tensor,
                         block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a tile's (out, lse) into the running state; with no state yet (None) the tile becomes it."""
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    return (torch.exp(lse - new_lse)[..., None] * out
            + torch.exp(block_lse - new_lse)[..., None] * block_out), new_lse


def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                        blocks: int = 2) -> torch.Tensor:
    """Attention over ``blocks`` sequence tiles on one device: each query tile visits the key tiles in
    order and merges them (causal: the diagonal tile is masked, later tiles skipped). Differentiable."""
    check_qkv(q, k, v, "blockwise_attention")
    if blocks < 1 or q.shape[2] % blocks:
        raise ValueError(f"blockwise_attention: sequence length {q.shape[2]} is not divisible into {blocks} blocks")
    outs = []
    key_tiles = list(zip(k.chunk(blocks, 2), v.chunk(blocks, 2)))
    for i, q_tile in enumerate(q.chunk(blocks, 2)):
        out = lse = None
        for j, (k_tile, v_tile) in enumerate(key_tiles[: i + 1] if causal else key_tiles):
            tile = attention_block(q_tile, k_tile, v_tile, causal=causal and i == j)
            out, lse = online_softmax_merge(out, lse, *tile)
        outs.append(out)
    return torch.cat(outs, 2).to(q.dtype)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def check_shard(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, world_size: int, layout: str,
                where: str) -> None:
    """ValueError (naming ``where`` and the rank) unless ``q, k, v`` are a rank's sequence shard of ``layout``
    (a zigzag shard is two chunks: an even length)."""
    check_layout(layout)
    check_qkv(q, k, v, f"rank {rank}: {where}")
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"rank {rank}: {where}(layout='zigzag') needs an even local sequence length "
                         f"(chunks r and 2p-1-r of 2p={2 * world_size}), got {q.shape[2]}")


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, *, dim: int,
                   layout: str = "contiguous") -> torch.Tensor:
    """Rank ``rank``'s piece of the sequence dim ``dim`` (a new tensor): chunk r of p ("contiguous"),
    or chunks r and 2p-1-r of 2p ("zigzag", which balances causal attention)."""
    check_layout(layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_sequence: rank {rank} is not in [0, {world_size})")
    chunks = 2 * world_size if layout == "zigzag" else world_size
    if x.shape[dim] % chunks:
        raise ValueError(f"rank {rank}: sequence length {x.shape[dim]} (dim {dim} of shape {tuple(x.shape)}) is not "
                         f"divisible by {chunks} ({layout} layout on world_size {world_size})")
    pieces = x.chunk(chunks, dim)
    if layout == "contiguous":
        return pieces[rank].clone()
    return torch.cat([pieces[rank], pieces[chunks - 1 - rank]], dim)


def sequence_positions(seq_len: int, rank: int, world_size: int, layout: str = "contiguous") -> torch.Tensor:
    """The global positions (int64) of rank ``rank``'s tokens under ``shard_sequence``'s ``layout``: what
    RoPE needs on a sequence shard, where the local indices 0, 1, ... would be wrong."""
    return shard_sequence(torch.arange(seq_len), rank, world_size, dim=0, layout=layout)


def unshard_sequence(pieces: list[torch.Tensor], *, dim: int, layout: str = "contiguous") -> torch.Tensor:
    """The full sequence from every rank's piece (in rank order): the inverse of ``shard_sequence``."""
    check_layout(layout)
    sizes = [piece.shape[dim] for piece in pieces]
    if len(set(sizes)) != 1 or (layout == "zigzag" and sizes[0] % 2):
        raise ValueError(f"unshard_sequence: pieces must have one {'even ' if layout == 'zigzag' else ''}length "
                         f"along dim {dim}, got {sizes}")
    if layout == "contiguous":
        return torch.cat(pieces, dim)
    halves = [piece.chunk(2, dim) for piece in pieces]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)
