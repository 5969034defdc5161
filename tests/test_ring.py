"""Ring attention: exact against dense SDPA (forward and backward), its bytes, its overlap, its balance, its memory."""

import pytest
import torch
from attention_cases import dense_grads, make_qkv, max_error, sharded_grads
from hypothesis import given, settings
from hypothesis import strategies as st

import tpsp_sim as ts

TOL = 1e-10
LAYOUTS = ("contiguous", "zigzag")


def seq_len(p: int, chunk: int, layout: str) -> int:
    """Full sequence length with ``chunk`` tokens per chunk (p chunks contiguous, 2p zigzag)."""
    return (2 * p if layout == "zigzag" else p) * chunk


def check_exact(p, causal, layout, chunk, d, heads=4, kv_heads=4, b=2, seed=0):
    q, k, v, dout = make_qkv(b, heads, kv_heads, seq_len(p, chunk, layout), d, seed=seed)
    got, _ = sharded_grads(ts.ring_attention, q, k, v, dout, p, causal=causal, layout=layout)
    assert max_error(got, dense_grads(q, k, v, dout, causal)) <= TOL


@pytest.mark.parametrize("chunk, d", [(1, 3), (3, 8)])  # chunk=1: one token per rank / per zigzag chunk
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
def test_ring_equals_dense_forward_and_backward(p, causal, layout, chunk, d):
    check_exact(p, causal, layout, chunk, d)


@pytest.mark.parametrize("d", [1, 16, 64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ring_head_dims(layout, d):
    check_exact(3, True, layout, 2, d, b=1, heads=2, kv_heads=2)


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", [2, 3, 4])
def test_ring_grouped_query_attention(p, layout, kv_heads):
    check_exact(p, True, layout, 2, 4, heads=4, kv_heads=kv_heads)


@settings(max_examples=12, deadline=None)
@given(p=st.integers(1, 5), chunk=st.integers(1, 3), d=st.integers(1, 6), group=st.sampled_from([1, 2, 3]),
       causal=st.booleans(), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16))
def test_ring_equals_dense_property(p, chunk, d, group, causal, layout, seed):
    check_exact(p, causal, layout, chunk, d, heads=2 * group, kv_heads=2, b=1, seed=seed)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p", [1, 4, 8])
def test_ring_bfloat16_within_four_ulps_of_float64(p, causal, layout):
    """Stated tolerance: every bf16 output/gradient is within 2^-6 (4 bf16 ulps) of its tensor's largest
    magnitude from the float64 truth on the same (bf16-rounded) inputs; tiles accumulate in float32."""
    q, k, v, dout = make_qkv(2, 4, 2, seq_len(p, 8, layout), 16, dtype=torch.bfloat16, seed=3)
    got, _ = sharded_grads(ts.ring_attention, q, k, v, dout, p, causal=causal, layout=layout)
    truth = dense_grads(*(x.double() for x in (q, k, v, dout)), causal)
    for g, t in zip(got, truth):
        assert g.dtype == torch.bfloat16
        assert (g.double() - t).abs().max() <= 2**-6 * t.abs().max()


# ---- communication ------------------------------------------------------------------------------

def forward_in_scope(comm, q, k, v, causal, layout, backward):
    shard = lambda x: ts.shard_sequence(x, comm.rank, comm.world_size, dim=2, layout=layout)
    q, k, v = (shard(x).requires_grad_() for x in (q, k, v))
    with comm.scope("layer0"):
        out = ts.ring_attention(q, k, v, comm, causal=causal, layout=layout)
    if backward:
        out.sum().backward()
    return out.detach()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_ring_bytes_forward_and_backward(p, layout, dtype):
    b, heads, kv_heads, n, d = 2, 4, 2, 6, 5
    q, k, v, _ = make_qkv(b, heads, kv_heads, p * n, d, dtype=dtype)
    trace = ts.run(forward_in_scope, q, k, v, True, layout, True, world_size=p).trace
    elems = b * kv_heads * n * d  # one K (or V) block
    s_in, s_acc = dtype.itemsize, (4 if dtype == torch.bfloat16 else dtype.itemsize)
    assert {e.scope for e in trace.events} <= {"layer0/ring_attn"}
    for r in range(p):
        fwd = trace.filter(rank=r, phase="forward", op="send")
        assert fwd.count() == p - 1  # p steps, p-1 shifts of one stacked K/V message
        assert {e.shape for e in fwd.events} <= {(2, b, kv_heads, n, d)}
        assert not any(e.blocking for e in fwd.events)
        assert fwd.total() == (p - 1) * 2 * elems * s_in
        assert trace.total("recv_bytes", rank=r, phase="forward") == fwd.total()
        bwd = trace.filter(rank=r, phase="backward", op="send")
        assert bwd.count() == (2 * p - 1 if p > 1 else 0)  # p-1 K/V shifts + p dK/dV shifts
        want = (p - 1) * 2 * elems * s_in + p * 2 * elems * s_acc if p > 1 else 0
        assert bwd.total() == want
        assert trace.total("recv_bytes", rank=r, phase="backward") == want
        assert {e.peer for e in fwd.events + bwd.events} <= {(r + 1) % p}


def test_next_shift_is_posted_before_the_tile_and_waited_after():
    """Overlap: between posting each K/V send and waiting on it, the rank computes a tile."""
    p = 4
    q, k, v, _ = make_qkv(1, 2, 2, p * 4, 4)
    res = ts.run(forward_in_scope, q, k, v, False, "contiguous", False, world_size=p, count_flops=True)
    trace = res.trace
    for r in range(p):
        waited = {w.event_seq: w.seq for w in trace.waits if w.rank == r}
        spans = [c.seq for c in trace.compute if c.rank == r and c.flops > 0]
        sends = trace.filter(rank=r, op="send").events
        assert len(sends) == p - 1
        for e in sends:
            assert any(e.seq < s < waited[e.seq] for s in spans), f"rank {r}: no compute while send #{e.seq} was in flight"


# ---- load balance and memory --------------------------------------------------------------------

def forward_flops(layout: str, p: int, b: int, heads: int, n: int, d: int) -> list[int]:
    q, k, v, _ = make_qkv(b, heads, heads, p * n, d)
    res = ts.run(forward_in_scope, q, k, v, True, layout, False, world_size=p, count_flops=True)
    return [sum(c.flops for c in res.trace.compute if c.rank == r) for r in range(p)]


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_causal_load_balance_contiguous_vs_zigzag(p):
    b, heads, n, d = 1, 2, 8, 4
    tile = 4 * b * heads * n * n * d  # q kᵀ and p v of one n x n tile
    contiguous, zigzag = forward_flops("contiguous", p, b, heads, n, d), forward_flops("zigzag", p, b, heads, n, d)
    assert contiguous == [tile * (r + 1) for r in range(p)]  # diagonal + r earlier blocks
    assert zigzag == [tile + (p - 1) * tile // 2] * p  # diagonal + p-1 half tiles, on every rank
    assert sum(contiguous) == sum(zigzag)
    ratio = max(contiguous) / min(contiguous)
    print(f"p={p}: causal FLOPs max/min across ranks: contiguous {ratio:.2f}, zigzag {max(zigzag) / min(zigzag):.2f}")
    assert ratio == p


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p", [2, 4])
def test_largest_tile_is_local_squared(p, causal, layout):
    """The largest tensor any rank makes (forward and backward) is one (s/p)² score tile, never s²."""
    b, heads, n, d = 1, 2, 16, 4  # n >= 2d, so a score tile outgrows every [.., n, d] tensor
    q, k, v, dout = make_qkv(b, heads, heads, p * n, d)
    _, res = sharded_grads(ts.ring_attention, q, k, v, dout, p, causal=causal, layout=layout, meter=True)
    assert [o[4] for o in res.outputs] == [b * heads * n * n] * p
    assert b * heads * n * n * p * p == b * heads * (p * n) ** 2


# ---- errors -------------------------------------------------------------------------------------

def call_ring(comm, q, k, v, layout):
    return ts.ring_attention(q, k, v, comm, layout=layout)


def test_ring_errors_name_rank_and_sizes():
    x = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"rank \d: ring_attention\(layout='zigzag'\) needs an even local .* 2p=4\), got 3"):
        ts.run(call_ring, x, x, x, "zigzag", world_size=2)
    with pytest.raises(ValueError, match=r"rank \d: ring_attention: q, k, v must agree on batch, seq and head_dim"):
        ts.run(call_ring, x, torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), "contiguous", world_size=2)
    with pytest.raises(ValueError, match="layout must be one of"):
        ts.run(call_ring, x, x, x, "striped", world_size=2)


# ---- real torch.distributed ---------------------------------------------------------------------

@pytest.mark.real
@pytest.mark.timeout(180)
@pytest.mark.parametrize("p", [2, 3])
def test_ring_on_gloo_processes_matches_dense_and_the_simulator(p):
    """The same ring (its isend/irecv order included) on real processes: exact, with the simulator's trace."""
    q, k, v, dout = make_qkv(1, 2, 2, 2 * p * 2, 4)
    (got, real), (_, sim) = (sharded_grads(ts.ring_attention, q, k, v, dout, p, causal=True, layout="zigzag",
                                           backend=backend) for backend in ("gloo", "sim"))
    assert max_error(got, dense_grads(q, k, v, dout, True)) <= TOL
    assert real.trace.events == sim.trace.events
