"""Single-process pieces: the tile kernel, its backward, the online-softmax merge, blockwise attention, sharding."""

import math

import pytest
import torch
from attention_cases import dense_grads, make_qkv, max_error
from hypothesis import given, settings
from hypothesis import strategies as st

import tpsp_sim as ts
from tpsp_sim.context_parallel.attention import attention_block_backward

TOL = 1e-10


def explicit_scores(q, k, causal):
    """Scores written independently of the package: einsum over explicitly repeated K heads."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[2]
        scores = scores.masked_fill(torch.arange(n)[None, :] > torch.arange(n)[:, None], float("-inf"))
    return scores


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_tile_equals_dense_and_its_lse_is_the_logsumexp(causal, kv_heads):
    q, k, v, _ = make_qkv(2, 4, kv_heads, 7, 5)
    out, lse = ts.attention_block(q, k, v, causal=causal)
    assert (out - ts.dense_attention(q, k, v, causal=causal)).abs().max() <= TOL
    assert (lse - explicit_scores(q, k, causal).logsumexp(-1)).abs().max() <= TOL


def test_dense_reference_gqa_is_repeated_heads():
    q, k, v, _ = make_qkv(1, 6, 2, 5, 3)
    repeated = ts.dense_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    assert (ts.dense_attention(q, k, v) - repeated).abs().max() <= TOL


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_tile_backward_with_global_lse_equals_autograd(causal, kv_heads):
    q, k, v, dout = make_qkv(2, 4, kv_heads, 6, 3, seed=1)
    out, lse = ts.attention_block(q, k, v, causal=causal)
    delta = (dout * out).sum(-1)
    got = attention_block_backward(q, k, v, dout, lse, delta, causal=causal)
    assert max_error(got, dense_grads(q, k, v, dout, causal)[1:]) <= TOL


def test_tile_backward_sums_over_key_tiles():
    """With the global lse, the gradients of two key tiles add up to the full tile's (what the ring relies on)."""
    q, k, v, dout = make_qkv(1, 2, 2, 8, 4, seed=2)
    out, lse = ts.attention_block(q, k, v)
    delta = (dout * out).sum(-1)
    dq, dk, dv = attention_block_backward(q, k, v, dout, lse, delta)
    parts = [attention_block_backward(q, k[:, :, s], v[:, :, s], dout, lse, delta) for s in (slice(0, 3), slice(3, 8))]
    assert (parts[0][0] + parts[1][0] - dq).abs().max() <= TOL
    assert (torch.cat([parts[0][1], parts[1][1]], 2) - dk).abs().max() <= TOL
    assert (torch.cat([parts[0][2], parts[1][2]], 2) - dv).abs().max() <= TOL


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), m=st.integers(2, 12), seed=st.integers(0, 2**16), data=st.data())
def test_merging_two_key_tiles_equals_one_tile(n, m, seed, data):
    split = data.draw(st.integers(1, m - 1))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, size, 3, generator=g, dtype=torch.float64) * 4 for size in (n, m, m))
    a = ts.attention_block(q, k[:, :, :split], v[:, :, :split])
    b = ts.attention_block(q, k[:, :, split:], v[:, :, split:])
    whole = ts.attention_block(q, k, v)
    for merged in (ts.online_softmax_merge(*a, *b), ts.online_softmax_merge(*b, *a)):
        assert max_error(merged, whole) <= TOL


def test_first_tile_sets_the_state():
    q, k, v, _ = make_qkv(1, 1, 1, 3, 2)
    out, lse = ts.attention_block(q, k, v)
    assert ts.online_softmax_merge(None, None, out, lse) == (out, lse)


def test_16bit_tiles_accumulate_in_float32():
    q, k, v, _ = make_qkv(1, 2, 2, 4, 8, dtype=torch.bfloat16)
    out, lse = ts.attention_block(q, k, v)
    assert out.dtype == lse.dtype == torch.float32
    assert ts.blockwise_attention(q, k, v, blocks=2).dtype == torch.bfloat16


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 12])
@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_attention_equals_dense_forward_and_backward(blocks, causal):
    q, k, v, dout = make_qkv(2, 4, 2, 12, 5, seed=blocks)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = ts.blockwise_attention(*leaves, causal=causal, blocks=blocks)
    out.backward(dout)
    got = (out.detach(), *(x.grad for x in leaves))
    assert max_error(got, dense_grads(q, k, v, dout, causal)) <= TOL


def test_blockwise_attention_rejects_blocks_that_do_not_divide():
    q, k, v, _ = make_qkv(1, 2, 2, 10, 4)
    with pytest.raises(ValueError, match="10 is not divisible into 4 blocks"):
        ts.blockwise_attention(q, k, v, blocks=4)


@pytest.mark.parametrize("shapes, message", [
    (((1, 4, 8, 4), (1, 4, 6, 4), (1, 4, 6, 4)), "agree on batch, seq and head_dim"),
    (((1, 4, 8, 4), (1, 4, 8, 4), (1, 2, 8, 4)), "k and v of one shape"),
    (((1, 4, 8, 4), (1, 3, 8, 4), (1, 3, 8, 4)), "4 query heads are not a multiple of 3"),
    (((4, 8, 4), (4, 8, 4), (4, 8, 4)), r"\[batch, heads, seq, head_dim\]"),
])
def test_mismatched_qkv_are_named(shapes, message):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        ts.blockwise_attention(q, k, v, blocks=1)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_zigzag_rank_holds_chunks_r_and_2p_minus_1_minus_r(p):
    x = torch.arange(2 * p * 3).view(1, -1)
    for r in range(p):
        chunks = x.view(2 * p, 3)
        want = torch.cat([chunks[r], chunks[2 * p - 1 - r]])
        assert torch.equal(ts.shard_sequence(x, r, p, dim=1, layout="zigzag")[0], want)
        assert torch.equal(ts.shard_sequence(x, r, p, dim=1)[0], x.view(p, 6)[r])


@settings(max_examples=30, deadline=None)
@given(p=st.integers(1, 6), chunk=st.integers(1, 4), dim=st.integers(0, 2), layout=st.sampled_from(ts.context_parallel.attention.LAYOUTS))
def test_unshard_inverts_shard(p, chunk, dim, layout):
    shape = [2, 3, 2]
    shape[dim] = chunk * 2 * p
    x = torch.randn(shape)
    pieces = [ts.shard_sequence(x, r, p, dim=dim, layout=layout) for r in range(p)]
    assert all(piece.shape[dim] == x.shape[dim] // p for piece in pieces)
    assert torch.equal(ts.unshard_sequence(pieces, dim=dim, layout=layout), x)
    assert all(piece.data_ptr() != x.data_ptr() for piece in pieces)  # each rank owns its piece


def test_shard_sequence_errors_name_the_numbers():
    x = torch.zeros(1, 2, 12, 4)
    with pytest.raises(ValueError, match=r"rank 1: sequence length 12 .* not divisible by 5 \(contiguous layout on world_size 5\)"):
        ts.shard_sequence(x, 1, 5, dim=2)
    with pytest.raises(ValueError, match=r"not divisible by 8 \(zigzag layout on world_size 4\)"):
        ts.shard_sequence(x, 0, 4, dim=2, layout="zigzag")
    with pytest.raises(ValueError, match="rank 4 is not in"):
        ts.shard_sequence(x, 4, 4, dim=2)
    with pytest.raises(ValueError, match="layout must be one of"):
        ts.shard_sequence(x, 0, 2, dim=2, layout="striped")
    with pytest.raises(ValueError, match=r"one even length along dim 2, got \[3, 3\]"):
        ts.unshard_sequence([torch.zeros(1, 1, 3), torch.zeros(1, 1, 3)], dim=2, layout="zigzag")
    with pytest.raises(ValueError, match=r"got \[2, 3\]"):
        ts.unshard_sequence([torch.zeros(1, 1, 2), torch.zeros(1, 1, 3)], dim=2)
