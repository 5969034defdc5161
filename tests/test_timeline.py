"""The per-rank timeline: compute hides ring transfers when blocks are large enough, and not when small."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tpsp_sim as ts
from tpsp_sim import cost

# Small numbers so that tiny CPU tensors sit on either side of the overlap block.
timeline = ts.timeline

TOY = cost.Hardware("toy", link_bandwidth=1e9, latency=0.0, peak_flops=32e9)
TOY_LATENCY = cost.Hardware("toy with latency", link_bandwidth=1e9, latency=2e-7, peak_flops=32e9)
BLOCK = 64  # TOY's overlap block for float32 K/V, by hand: c = 4 bytes · 32e9 FLOP/s / (2 · 1e9 B/s) = 64 tokens


def test_toy_overlap_block_is_64_tokens():
    assert cost.ring_overlap_block(TOY, dtype_bytes=4) == BLOCK


def fake_ring(comm, c, d):
    """A hand-written ring: post the K/V shift, compute q kᵀ and p v on the current block, then wait."""
    g = torch.Generator().manual_seed(comm.rank)
    q, kv = torch.randn(c, d, generator=g), torch.randn(2, c, d, generator=g)
    p, nxt, prev = comm.world_size, (comm.rank + 1) % comm.world_size, (comm.rank - 1) % comm.world_size
    out = torch.zeros(c, d)
    for step in range(p):
        if step < p - 1:
            sent, received = comm.isend(kv, nxt), comm.irecv(kv, prev)
        out += torch.softmax(q @ kv[0].T, -1) @ kv[1]  # 2·c²·d + 2·c²·d FLOPs
        if step < p - 1:
            sent.wait()
            kv = received.wait()
    return out


def ring_times(c, d, dtype_bytes, hw):
    compute = 4 * c * c * d / hw.peak_flops
    transfer = hw.latency + 2 * c * d * dtype_bytes / hw.link_bandwidth
    return compute, transfer


@pytest.mark.parametrize("hw", [TOY, TOY_LATENCY], ids=lambda hw: hw.name)
@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("factor", [0.25, 0.5, 2, 4])
def test_fake_ring_hides_transfers_only_above_the_overlap_block(p, factor, hw):
    block = BLOCK
    c, d = int(block * factor), 8
    tl = timeline(ts.run(fake_ring, c, d, world_size=p, count_flops=True).trace, hw)
    compute, transfer = ring_times(c, d, 4, hw)
    for r in range(p):
        assert tl.compute(r) == pytest.approx(p * compute, rel=1e-9)
        assert tl.exposed(r) == pytest.approx((p - 1) * max(0.0, transfer - compute), rel=1e-9, abs=1e-15)
        assert tl.hidden(r) == pytest.approx((p - 1) * min(compute, transfer), rel=1e-9)
        assert tl.end(r) == pytest.approx((p - 1) * max(compute, transfer) + compute, rel=1e-9)
        assert tl.idle(r) == pytest.approx(0.0, abs=1e-15)
    if hw is TOY:  # without latency, the overlap block is exactly where hiding starts
        assert (tl.exposed(0) == pytest.approx(0.0, abs=1e-15)) == (factor >= 1)


def ring_attention_fn(comm, q, k, v, causal, backward):
    shards = [ts.shard_sequence(x, comm.rank, comm.world_size, dim=2).requires_grad_() for x in (q, k, v)]
    out = ts.ring_attention(*shards, comm, causal=causal)
    if backward:
        out.sum().backward()
    return out.detach()


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("factor", [0.5, 2])
def test_ring_attention_forward_hides_kv_above_the_overlap_block(p, factor):
    block = BLOCK
    n, d, heads = int(block * factor), 8, 2  # n tokens per rank
    q, k, v = (torch.randn(1, heads, n * p, d) for _ in range(3))
    tl = timeline(ts.run(ring_attention_fn, q, k, v, False, False, world_size=p, count_flops=True).trace, TOY)
    compute, transfer = (heads * t for t in ring_times(n, d, 4, TOY))  # every head's tile, every head's K/V
    for r in range(p):
        assert tl.compute(r) == pytest.approx(p * compute, rel=1e-9)
        assert tl.exposed(r) == pytest.approx((p - 1) * max(0.0, transfer - compute), rel=1e-9, abs=1e-15)
        assert tl.end(r) == pytest.approx((p - 1) * max(compute, transfer) + compute, rel=1e-9)
    assert (tl.exposed(0) > 0) == (factor < 1)


@pytest.mark.parametrize("p", [2, 4])
def test_ring_attention_backward_exposes_only_the_last_dkv_shift_when_blocks_are_large(p):
    """Backward's second ring carries dK/dV home after the last tile: that one shift has nothing to hide behind."""
    n, d = 4 * BLOCK, 8
    q, k, v = (torch.randn(1, 1, n * p, d) for _ in range(3))
    tl = timeline(ts.run(ring_attention_fn, q, k, v, False, True, world_size=p, count_flops=True).trace, TOY)
    last_shift = 2 * n * d * 4 / TOY.link_bandwidth
    for r in range(p):
        assert tl.exposed(r) == pytest.approx(last_shift, rel=1e-9)


def test_causal_contiguous_ring_leaves_early_ranks_idle_and_zigzag_balances_them():
    p, n, d = 4, 64, 8
    q, k, v = (torch.randn(1, 1, n * p, d) for _ in range(3))

    def fn(comm, layout):
        shards = [ts.shard_sequence(x, comm.rank, p, dim=2, layout=layout).requires_grad_() for x in (q, k, v)]
        return ts.ring_attention(*shards, comm, causal=True, layout=layout).detach()

    contiguous = timeline(ts.run(fn, "contiguous", world_size=p, count_flops=True).trace, TOY)
    zigzag = timeline(ts.run(fn, "zigzag", world_size=p, count_flops=True).trace, TOY)
    computes = [contiguous.compute(r) for r in range(p)]
    assert computes == sorted(computes) and computes[-1] == pytest.approx(p * computes[0])  # rank r: r+1 tiles
    assert len({round(zigzag.compute(r), 15) for r in range(p)}) == 1
    assert zigzag.end() < contiguous.end()


def test_collectives_wait_for_the_last_rank_to_arrive():
    """Rank r computes (r+1)·X FLOPs, then all ranks all-reduce: the others idle until the last arrives."""
    p, m = 4, 16

    def fn(comm):
        a = torch.ones(m * (comm.rank + 1), 8)
        return comm.all_reduce((a @ torch.ones(8, 8)).sum(0))

    tl = timeline(ts.run(fn, world_size=p, count_flops=True).trace, TOY)
    unit = 2 * m * 8 * 8 / TOY.peak_flops
    reduce = 2 * 3 / 4 * 32 / 1e9  # all_reduce of 8 float32 on 4 ranks at 1 GB/s, no latency: 48 B on the wire
    for r in range(p):
        assert tl.compute(r) == pytest.approx((r + 1) * unit)
        assert tl.idle(r) == pytest.approx((p - 1 - r) * unit)
        assert tl.end(r) == pytest.approx(p * unit + reduce)


@settings(max_examples=25, deadline=None)
@given(p=st.integers(1, 4), rows=st.lists(st.lists(st.integers(1, 6), min_size=4, max_size=4), min_size=1, max_size=3))
def test_property_compute_then_all_reduce_steps_end_at_the_sum_of_the_slowest(p, rows):
    """Steps of (compute rows[k][r] units, all-reduce): each step ends when its slowest rank is done."""
    def fn(comm):
        for row in rows:
            a = torch.ones(row[comm.rank], 4)
            comm.all_reduce((a @ torch.ones(4, 4)).sum(0))

    tl = timeline(ts.run(fn, world_size=p, count_flops=True).trace, TOY)
    unit = 2 * 4 * 4 / TOY.peak_flops
    reduce = 2 * (p - 1) * 16 // p / 1e9  # all_reduce of 4 float32 at 1 GB/s, no latency (whole bytes)
    assert tl.end() == pytest.approx(sum(max(row[:p]) * unit + reduce for row in rows), rel=1e-9)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_blocking_collectives_without_compute_take_what_estimate_says(p):
    x = torch.randn(4 * p, 3, dtype=torch.float64)

    def fn(comm, x):
        comm.all_gather(comm.reduce_scatter(x), dim=0)
        comm.all_to_all(x, 0, 1)
        comm.broadcast(x, src=0)
        comm.barrier()

    trace = ts.run(fn, x, world_size=p).trace
    tl, est = timeline(trace, TOY_LATENCY), cost.estimate(trace, TOY_LATENCY)
    for r in range(p):
        assert tl.comm(r) == pytest.approx(est.per_rank()[r], rel=1e-12)
        assert tl.end(r) == pytest.approx(est.max_per_rank(), rel=1e-12)
        assert tl.hidden(r) == 0


@pytest.mark.parametrize("p", [2, 3, 4])
def test_sendrecv_halves_overlap_and_blocking_send_then_recv_do_not(p):
    x = torch.randn(250, dtype=torch.float32)  # 1000 bytes
    shift = 2e-7 + 1000 / 1e9  # one message: α + n/B

    def ring_sendrecv(comm, x):
        for _ in range(3):
            x = comm.sendrecv(x, (comm.rank + 1) % p, (comm.rank - 1) % p)

    tl = timeline(ts.run(ring_sendrecv, x, world_size=p).trace, TOY_LATENCY)
    assert [tl.end(r) for r in range(p)] == pytest.approx([3 * shift] * p, rel=1e-12)

    def even_sends_first(comm, x):  # a blocking ring: even ranks send then receive, odd ones the reverse
        right, left = (comm.rank + 1) % p, (comm.rank - 1) % p
        if comm.rank % 2 == 0:
            comm.send(x, right)
            comm.recv(x, left)
        else:
            comm.recv(x, left)
            comm.send(x, right)

    tl = timeline(ts.run(even_sends_first, x, world_size=p).trace, TOY_LATENCY)
    rounds = 2 if p % 2 == 0 else 3  # odd rings: the last even rank sends to even rank 0, which is busy sending
    assert tl.end() == pytest.approx(rounds * shift, rel=1e-12)


def test_two_sends_from_one_rank_share_its_link():
    def fn(comm):
        x = torch.zeros(250)
        if comm.rank == 0:
            handles = [comm.isend(x, 1), comm.isend(x, 2)]
        else:
            handles = [comm.irecv(x, 0)]
        for h in handles:
            h.wait()

    tl = timeline(ts.run(fn, world_size=3).trace, TOY)
    one = 1000 / TOY.link_bandwidth
    assert tl.end(1) == pytest.approx(one) and tl.end(2) == pytest.approx(2 * one)  # the second waits for the first
    assert tl.comm(0) == pytest.approx(2 * one)


def test_a_partial_trace_raises_instead_of_hanging():
    def fn(comm):
        comm.all_reduce(torch.ones(4))

    trace = ts.run(fn, world_size=2).trace
    with pytest.raises(ts.SimulationError, match="cannot lay out the trace"):
        timeline(trace.filter(rank=0), TOY)


def sp_column_layer(comm):
    """A sequence-parallel column layer: backward is all-gather X, dX = dY W, reduce-scatter dX, dW = dYᵀ X."""
    g = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(32, 32, bias=False)
    dense.weight.data = torch.randn(32, 32, generator=g)
    layer = ts.ColumnParallelLinear.from_dense(dense, comm, sequence_parallel=True)
    x = torch.randn(1, 64 // comm.world_size, 32, generator=g, requires_grad=True)
    layer(x).sum().backward()


@pytest.mark.parametrize("overlap", [False, True])
def test_overlap_tp_hides_dx_under_the_all_gather_and_dw_under_the_reduce_scatter(overlap):
    """t = 2, s = 64, 32 -> 32 features, float32, TOY (1 GB/s, 32 GFLOP/s):
    all-gather of the 32 x 32 shard: 4096 B -> 4.096 µs; reduce-scatter of the 64 x 32 dX: half of
    8192 B -> 4.096 µs; each matmul (Y, dX, dW) 2 · 64 · 32 · 16 FLOPs -> 2.048 µs.
    Backward without overlap: AG + dX + RS + dW = 12.288 µs; with it dX runs under the all-gather and dW
    under the reduce-scatter: AG + RS = 8.192 µs (the forward's all-gather stays exposed either way)."""
    trace = ts.run(sp_column_layer, world_size=2, count_flops=True).trace
    tl = timeline(trace, TOY, overlap_tp=overlap)
    forward = 4.096e-6 + 2.048e-6
    backward = 2 * 4.096e-6 if overlap else 2 * 4.096e-6 + 2 * 2.048e-6
    for r in range(2):
        assert tl.end(r) == pytest.approx(forward + backward, rel=1e-9)
        assert tl.exposed(r) == pytest.approx(3 * 4.096e-6 - (2 * 2.048e-6 if overlap else 0.0), rel=1e-9)
        assert tl.compute(r) == pytest.approx(3 * 2.048e-6, rel=1e-9)


def test_exposed_by_axis_adds_up_to_exposed():
    p, n, d = 3, 16, 8
    q, k, v = (torch.randn(1, 2, n * p, d) for _ in range(3))
    tl = timeline(ts.run(ring_attention_fn, q, k, v, True, True, world_size=p, count_flops=True).trace, TOY_LATENCY)
    for r in range(p):
        by_axis = tl.exposed_by_axis(r)
        assert list(by_axis) == [None] and by_axis[None] == pytest.approx(tl.exposed(r), rel=1e-12)
        assert tl.compute(r) + by_axis[None] + tl.idle(r) == pytest.approx(tl.end(r), rel=1e-12)


def test_mfu_scales_compute_only():
    p, n, d = 2, 16, 8
    q, k, v = (torch.randn(1, 1, n * p, d) for _ in range(3))
    trace = ts.run(ring_attention_fn, q, k, v, False, False, world_size=p, count_flops=True).trace
    full, half = timeline(trace, TOY), timeline(trace, TOY, mfu=0.5)
    assert half.compute(0) == pytest.approx(2 * full.compute(0), rel=1e-12)
    assert half.comm(0) == pytest.approx(full.comm(0), rel=1e-12)
    with pytest.raises(ValueError, match="mfu must be in"):
        timeline(trace, TOY, mfu=0)


def test_overlap_tp_leaves_plain_tp_all_reduces_blocking():
    """Plain TP records f's all-reduce after the whole linear backward: the compute after it needs dX."""
    def tp_column_layer(comm):
        dense = torch.nn.Linear(32, 32, bias=False)
        layer = ts.ColumnParallelLinear.from_dense(dense, comm)
        layer(torch.randn(1, 64, 32, requires_grad=True)).sum().backward()

    trace = ts.run(tp_column_layer, world_size=2, count_flops=True).trace
    assert trace.count(op="all_reduce", phase="backward") == 2
    assert timeline(trace, TOY, overlap_tp=True).spans == timeline(trace, TOY).spans
