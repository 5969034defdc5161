"""Collectives posted with async_op=True: exact, completed at wait(), overlapped in the timeline, never hung."""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import tpsp_sim as ts
from tpsp_sim import cost

TOY = cost.Hardware("toy", link_bandwidth=1e9, latency=0.0, peak_flops=32e9)


def rank_input(r, p):
    g = torch.Generator().manual_seed(100 + r)
    return torch.randn(2 * p, 3, 5, generator=g, dtype=torch.float64)


def five_collectives(comm, async_op):
    """Every collective the Comm can post asynchronously; the async version changes its input in place before
    it waits, and waits in the reverse order of posting."""
    p, x = comm.world_size, rank_input(comm.rank, comm.world_size)
    calls = [lambda: comm.all_reduce(x, async_op=async_op), lambda: comm.all_reduce(x, "max", async_op=async_op),
             lambda: comm.all_gather(x, 2, async_op=async_op), lambda: comm.reduce_scatter(x, 0, "avg", async_op=async_op),
             lambda: comm.broadcast(x, p - 1, async_op=async_op), lambda: comm.all_to_all(x, 0, 1, async_op=async_op)]
    if not async_op:
        return [call() for call in calls]
    works = [call() for call in calls]
    x.mul_(-7)  # after posting: the collective has what was posted
    return [work.wait() for work in reversed(works)][::-1]


@pytest.mark.parametrize("p", [1, 2, 3, 5])
def test_async_collectives_equal_the_blocking_ones_and_the_dense_reference(p):
    blocking = ts.run(five_collectives, False, world_size=p)
    posted = ts.run(five_collectives, True, world_size=p)
    xs = [rank_input(r, p) for r in range(p)]
    dense_sum, dense_gather = sum(xs[1:], xs[0].clone()), torch.cat(xs, 2)
    for r in range(p):
        for got, want in zip(posted.outputs[r], blocking.outputs[r]):
            assert torch.equal(got, want)
        assert torch.equal(posted.outputs[r][2], dense_gather)
        torch.testing.assert_close(posted.outputs[r][0], dense_sum, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(posted.outputs[r][3], dense_sum.chunk(p)[r] / p, rtol=1e-14, atol=1e-14)
    # the same calls and bytes; only the blocking flag differs, and each async call has its WaitMark (in reverse)
    assert [replace(e, blocking=True, seq=0) for e in posted.trace.events] == \
           [replace(e, seq=0) for e in blocking.trace.events]
    assert not any(e.blocking for e in posted.trace.events) and blocking.trace.waits == []
    for r in range(p):
        events = [e.seq for e in posted.trace.events if e.rank == r]
        assert [w.event_seq for w in posted.trace.waits if w.rank == r] == events[::-1]


def two_groups_waited_in_opposite_orders(comm):
    """Both ranks post on group a, then on group b (the same members), but each waits for one call before
    posting the other: rank 0 for a's, rank 1 for b's, which it posts first. NCCL would hang."""
    b = comm.new_group([0, 1])
    x = torch.ones(4)
    if comm.rank == 0:
        comm.all_reduce(x, async_op=True).wait()
        b.all_reduce(x, async_op=True).wait()
    else:
        b.all_reduce(x, async_op=True).wait()
        comm.all_reduce(x, async_op=True).wait()


def test_waiting_for_a_call_a_member_has_not_posted_is_a_deadlock_not_a_hang():
    with pytest.raises(ts.DeadlockError) as info:
        ts.run(two_groups_waited_in_opposite_orders, world_size=2, timeout=30)
    text = str(info.value)
    assert "rank 0: waits in wait() of all_reduce" in text and "ranks [1] that have not called it" in text
    assert "rank 1: waits in wait() of all_reduce" in text and "ranks [0] that have not called it" in text


def test_waits_in_any_order_once_every_member_has_posted():
    def fn(comm):
        b = comm.new_group([0, 1])
        x = torch.full((2,), comm.rank + 1.0, dtype=torch.float64)
        first, second = comm.all_reduce(x, async_op=True), b.all_gather(x, async_op=True)
        waited = [second.wait(), first.wait()] if comm.rank == 0 else [first.wait(), second.wait()][::-1]
        return waited

    res = ts.run(fn, world_size=2)
    for gathered, summed in res.outputs:
        assert torch.equal(gathered, torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=torch.float64))
        assert torch.equal(summed, torch.full((2,), 3.0, dtype=torch.float64))


@settings(max_examples=20, deadline=None)
@given(p=st.integers(1, 4), sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data())
def test_property_any_wait_order_per_rank_gives_the_dense_sums(p, sizes, data):
    """Every rank posts the same all-reduces, then waits for them in its own order (drawn per rank)."""
    orders = [data.draw(st.permutations(range(len(sizes)))) for _ in range(p)]

    def fn(comm):
        xs = [torch.arange(n, dtype=torch.float64) * (comm.rank + 1) + k for k, n in enumerate(sizes)]
        works = [comm.all_reduce(x, async_op=True) for x in xs]
        got = {k: works[k].wait() for k in orders[comm.rank]}
        return [got[k] for k in range(len(sizes))]

    res = ts.run(fn, world_size=p)
    for r in range(p):
        for k, n in enumerate(sizes):  # sum over ranks q of (q+1)·i + k = p(p+1)/2 · i + p·k
            want = torch.arange(n, dtype=torch.float64) * (p * (p + 1) // 2) + p * k
            assert torch.equal(res.outputs[r][k], want)
        assert [w.event_seq for w in res.trace.waits if w.rank == r] == list(orders[r])


def test_a_rank_that_fails_releases_the_ranks_waiting_on_its_async_call():
    def fn(comm):
        work = comm.all_gather(torch.ones(2), async_op=True) if comm.rank else None
        if comm.rank == 0:
            raise ValueError("rank 0 gives up before posting")
        work.wait()

    with pytest.raises(ts.SimulationError, match="rank 0 gives up before posting"):
        ts.run(fn, world_size=3, timeout=30)


def test_a_mismatch_is_caught_when_the_last_rank_posts_though_nobody_waits():
    def fn(comm):
        x = torch.ones(4)
        with comm.scope("grads"):
            comm.all_reduce(x, async_op=True) if comm.rank == 0 else comm.all_gather(x, async_op=True)

    with pytest.raises(ts.CollectiveMismatchError, match=r"(?s)collective #0.*rank 0: all_reduce.*'grads'.*"
                                                         r"rank 1: all_gather"):
        ts.run(fn, world_size=2)


def test_an_async_call_some_member_never_makes_fails_the_run_at_its_end():
    """Nobody waits on it (waiting would be a deadlock), so only the end of the run can tell."""
    def fn(comm):
        if comm.rank < 2:
            with comm.scope("tail"):
                comm.reduce_scatter(torch.ones(6), async_op=True)

    with pytest.raises(ts.CollectiveMismatchError) as info:
        ts.run(fn, world_size=3)
    assert ("ranks 0-1: posted reduce_scatter" in str(info.value)
            and "collective #0 of group (0, 1, 2), which ranks [2] never called in scope 'tail'" in str(info.value))


def test_a_call_every_member_posted_needs_no_wait():
    """As on gloo or NCCL, it completes in the background; the trace has its event and no WaitMark."""
    def fn(comm):
        comm.all_reduce(torch.ones(3), async_op=True)
        return comm.all_reduce(torch.ones(1))

    res = ts.run(fn, world_size=3, count_flops=True)
    assert [out.item() for out in res.outputs] == [3.0] * 3 and res.trace.waits == []
    tl = ts.timeline(res.trace, TOY)
    assert [len(tl.of(r, "comm")) for r in range(3)] == [2] * 3


def compute_between_call_and_wait(comm, m, async_op):
    g = torch.ones(64)  # 256 bytes
    work = comm.all_reduce(g, async_op=async_op)
    torch.ones(m, 8) @ torch.ones(8, 8)  # 2·m·8·8 FLOPs
    if async_op:
        work.wait()


@pytest.mark.parametrize("m", [16, 96, 128])
def test_async_all_reduce_hides_behind_the_compute_between_the_call_and_its_wait(m):
    """Closed form, 4 ranks on TOY (1 GB/s, no latency, 32 GFLOP/s): the ring all-reduce of 256 bytes takes
    T_ar = 2·(p−1)/p · 256 B / 1 GB/s = 384 ns, the matmul T_c = 2·m·64 / 32e9 = 4·m ns. Blocking, the rank
    ends at T_ar + T_c; posted asynchronously before the matmul and waited after it, at max(T_ar, T_c),
    with min(T_ar, T_c) hidden and max(0, T_ar − T_c) exposed (m = 96: exactly hidden; m = 128: 128 ns spare)."""
    t_ar, t_c = 384e-9, 4 * m * 1e-9
    blocking = ts.timeline(ts.run(compute_between_call_and_wait, m, False, world_size=4, count_flops=True).trace, TOY)
    overlapped = ts.timeline(ts.run(compute_between_call_and_wait, m, True, world_size=4, count_flops=True).trace, TOY)
    for r in range(4):
        assert blocking.end(r) == pytest.approx(t_ar + t_c, rel=1e-12)
        assert blocking.hidden(r) == 0
        assert overlapped.end(r) == pytest.approx(max(t_ar, t_c), rel=1e-12)
        assert overlapped.hidden(r) == pytest.approx(min(t_ar, t_c), rel=1e-12)
        assert overlapped.exposed(r) == pytest.approx(max(0.0, t_ar - t_c), rel=1e-9, abs=1e-18)
        assert [s.blocking for s in overlapped.of(r, "comm")] == [False]


def test_an_async_collective_starts_when_its_last_member_posts_it():
    """Rank r computes r·T_c before posting; the all-reduce starts at 3·T_c (rank 3's post) and every rank
    that posted earlier stalls at its wait until 3·T_c + T_ar (T_c = 64 ns, T_ar = 384 ns: closed forms above)."""
    def fn(comm):
        torch.ones(16 * comm.rank, 8) @ torch.ones(8, 8)
        comm.all_reduce(torch.ones(64), async_op=True).wait()

    tl = ts.timeline(ts.run(fn, world_size=4, count_flops=True).trace, TOY)
    for r in range(4):
        (span,) = tl.of(r, "comm")
        assert (span.start, span.end) == (pytest.approx(192e-9), pytest.approx(576e-9))
        assert tl.end(r) == pytest.approx(576e-9)


@pytest.mark.filterwarnings("ignore:`torch.distributed.*` is deprecated:FutureWarning")
@pytest.mark.parametrize("p", [2, 3])
def test_dist_async_op_collectives_on_virtual_ranks(p):
    """dist.all_reduce / all_gather_into_tensor / reduce_scatter_tensor (the names code in the wild uses; torch
    2.13 warns them deprecated) with async_op=True under ts.run(..., torch_distributed=True): outputs
    untouched until wait(), then exact."""
    def fn(comm):
        r = dist.get_rank()
        x = rank_input(r, p)
        summed, gathered, scattered = x.clone(), torch.zeros(p * 2 * p, 3, 5, dtype=x.dtype), torch.zeros(2, 3, 5, dtype=x.dtype)
        works = [dist.all_reduce(summed, async_op=True), dist.all_gather_into_tensor(gathered, x, async_op=True),
                 dist.reduce_scatter_tensor(scattered, x, async_op=True)]
        untouched = torch.equal(summed, x) and not gathered.any() and not scattered.any()
        for work in works:
            work.wait()
        return untouched, summed, gathered, scattered

    res = ts.run(fn, world_size=p, torch_distributed=True)
    xs = [rank_input(r, p) for r in range(p)]
    dense = sum(xs[1:], xs[0].clone())
    for r, (untouched, summed, gathered, scattered) in enumerate(res.outputs):
        assert untouched and torch.equal(gathered, torch.cat(xs))
        torch.testing.assert_close(summed, dense, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(scattered, dense.chunk(p)[r], rtol=1e-14, atol=1e-14)
    assert [e.blocking for e in res.trace.events] == [False] * 3 * p and len(res.trace.waits) == 3 * p


def test_run_solo_records_an_async_call_and_its_wait():
    def fn(comm):
        comm.all_gather(torch.empty(2, 3, device="meta"), async_op=True).wait()

    trace = ts.sim.solo.run_solo(fn, world_size=4)
    assert [(e.op, e.blocking, e.nbytes) for e in trace.events] == [("all_gather", False, 24)]
    assert [(w.seq, w.event_seq) for w in trace.waits] == [(1, 0)]


@pytest.mark.real
@pytest.mark.timeout(180)
def test_gloo_runs_async_collectives_with_torchs_own_async_op_and_records_the_same_trace():
    sim = ts.run(five_collectives, True, world_size=2)
    real = ts.run(five_collectives, True, world_size=2, backend="gloo")
    for r in range(2):
        for got, want in zip(real.outputs[r], sim.outputs[r]):
            assert torch.equal(got, want)
    assert real.trace.events == sim.trace.events and real.trace.waits == sim.trace.waits


def all_reduce_in_flight_while_rank_0_sends(comm):
    """Correct only if the all-reduce runs in the background: rank 1 receives before its own all-reduce."""
    x = torch.full((3,), dist.get_rank() + 1.0)
    if dist.get_rank() == 0:
        work = dist.all_reduce(x, async_op=True)
        dist.send(torch.ones(1), 1)
        work.wait()
    else:
        dist.recv(torch.empty(1), 0)
        dist.all_reduce(x)
    return x


def test_a_collective_in_flight_during_a_send_runs_on_virtual_ranks():
    res = ts.run(all_reduce_in_flight_while_rank_0_sends, world_size=2, torch_distributed=True)
    assert all(torch.equal(x, torch.full((3,), 3.0)) for x in res.outputs)
    assert [(e.op, e.blocking) for e in res.trace.events if e.rank == 0] == [("all_reduce", False), ("send", False)]
    assert [(e.op, e.blocking) for e in res.trace.events if e.rank == 1] == [("recv", False), ("all_reduce", True)]


@pytest.mark.real
@pytest.mark.timeout(180)
def test_a_collective_in_flight_during_a_send_runs_on_gloo_with_the_same_trace():
    sim = ts.run(all_reduce_in_flight_while_rank_0_sends, world_size=2, torch_distributed=True)
    real = ts.run(all_reduce_in_flight_while_rank_0_sends, world_size=2, backend="gloo", torch_distributed=True,
                  timeout=60)
    assert all(torch.equal(x, torch.full((3,), 3.0)) for x in real.outputs)
    assert real.trace.events == sim.trace.events and real.trace.waits == sim.trace.waits
