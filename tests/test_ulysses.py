"""Ulysses attention: exact against dense SDPA (forward and backward), four all-to-alls each way."""

import pytest
import torch
from attention_cases import dense_grads, make_qkv, max_error, sharded_grads

import tpsp_sim as ts

TOL = 1e-10


@pytest.mark.parametrize("n, d", [(1, 3), (3, 8)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
def test_ulysses_equals_dense_forward_and_backward(p, causal, n, d):
    q, k, v, dout = make_qkv(2, 24, 24, p * n, d, seed=p)
    got, _ = sharded_grads(ts.ulysses_attention, q, k, v, dout, p, causal=causal)
    assert max_error(got, dense_grads(q, k, v, dout, causal)) <= TOL


@pytest.mark.parametrize("p", [2, 4])
def test_ulysses_grouped_query_attention(p):
    q, k, v, dout = make_qkv(1, 8, 4, p * 3, 4)
    got, _ = sharded_grads(ts.ulysses_attention, q, k, v, dout, p, causal=True)
    assert max_error(got, dense_grads(q, k, v, dout, True)) <= TOL


def test_ulysses_bfloat16_within_four_ulps_of_float64():
    """Same stated tolerance as ring attention: 2^-6 of each tensor's largest magnitude."""
    q, k, v, dout = make_qkv(2, 8, 8, 4 * 16, 16, dtype=torch.bfloat16, seed=3)
    got, _ = sharded_grads(ts.ulysses_attention, q, k, v, dout, 4, causal=True)
    for g, t in zip(got, dense_grads(*(x.double() for x in (q, k, v, dout)), True)):
        assert (g.double() - t).abs().max() <= 2**-6 * t.abs().max()


@pytest.mark.parametrize("kv_heads", [8, 4])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_ulysses_sends_four_all_to_alls_each_way(p, kv_heads):
    b, heads, n, d = 2, 8, 3, 5
    q, k, v, dout = make_qkv(b, heads, kv_heads, p * n, d, dtype=torch.float32)
    _, res = sharded_grads(ts.ulysses_attention, q, k, v, dout, p, causal=False)
    trace = res.trace
    q_bytes, kv_bytes = b * heads * n * d * 4, b * kv_heads * n * d * 4  # out is q-sized at the last all-to-all
    for r in range(p):
        for phase in ("forward", "backward"):
            events = trace.filter(rank=r, phase=phase, scope="ulysses_attn").events
            assert [e.op for e in events] == ["all_to_all"] * 4
            assert sorted(e.nbytes for e in events) == sorted([q_bytes, kv_bytes, kv_bytes, q_bytes])
            assert sum(e.sent_bytes for e in events) == (p - 1) * (2 * q_bytes + 2 * kv_bytes) // p
    assert trace.count() == 8 * p


def call_ulysses(comm, q, k, v):
    return ts.ulysses_attention(q, k, v, comm)


def test_ulysses_needs_heads_divisible_by_world_size():
    x, kv = torch.zeros(1, 6, 2, 4), torch.zeros(1, 3, 2, 4)
    with pytest.raises(ValueError, match=r"rank \d of its group: ulysses_attention needs heads divisible by world_size 4; got 6 query"):
        ts.run(call_ulysses, x, x, x, world_size=4)
    with pytest.raises(ValueError, match="got 6 query heads and 3 key/value heads"):
        ts.run(call_ulysses, x, kv, kv, world_size=2)
    with pytest.raises(ValueError, match="must agree on batch, seq and head_dim"):
        ts.run(call_ulysses, x, torch.zeros(1, 6, 3, 4), torch.zeros(1, 6, 3, 4), world_size=2)
