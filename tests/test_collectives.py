"""Every collective on virtual ranks equals a hand-computed reference, and its trace bytes equal the
ring formulas of design.md section 4 (written out again here, independently of trace.wire_bytes)."""

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tpsp_sim as ts

WORLD_SIZES = [1, 2, 3, 4, 8]


def per_rank(p, shape, dtype=torch.float64, seed=0):
    """Different, integer-valued data on every rank (exact in any summation order)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-9, 10, shape, generator=g).to(dtype) for _ in range(p)]


def call(name, **kw):
    def fn(comm, xs):
        return getattr(comm, name)(xs[comm.rank], **kw)
    return fn


def sent(res, **filters):
    return [res.trace.total("sent_bytes", rank=r, **filters) for r in range(len(res.outputs))]


def received(res, **filters):
    return [res.trace.total("recv_bytes", rank=r, **filters) for r in range(len(res.outputs))]


@pytest.mark.parametrize("p", WORLD_SIZES)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_all_gather(p, dim):
    xs = per_rank(p, (2, 3))
    res = ts.run(call("all_gather", dim=dim), xs, world_size=p)
    expected = torch.cat(xs, dim)
    for out in res.outputs:
        assert torch.equal(out, expected)
    n = xs[0].numel() * 8
    assert sent(res) == received(res) == [(p - 1) * n] * p


@pytest.mark.parametrize("p", WORLD_SIZES)
@pytest.mark.parametrize("op", ["sum", "max", "min", "prod", "avg"])
def test_all_reduce(p, op):
    xs = per_rank(p, (4, 8))
    res = ts.run(call("all_reduce", op=op), xs, world_size=p)
    stacked = torch.stack(xs)
    expected = {"sum": stacked.sum(0), "max": stacked.amax(0), "min": stacked.amin(0),
                "prod": stacked.prod(0), "avg": stacked.sum(0) / p}[op]
    for out in res.outputs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    N = 4 * 8 * 8
    assert sent(res) == received(res) == [2 * (p - 1) * N // p] * p


@pytest.mark.parametrize("p", WORLD_SIZES)
@pytest.mark.parametrize("dim", [0, 1])
def test_reduce_scatter(p, dim):
    shape = [3, 5]
    shape[dim] = 2 * p
    xs = per_rank(p, tuple(shape))
    res = ts.run(call("reduce_scatter", dim=dim), xs, world_size=p)
    total = sum(xs)
    for r, out in enumerate(res.outputs):
        assert torch.equal(out, total.chunk(p, dim)[r])
    N = xs[0].numel() * 8
    assert sent(res) == received(res) == [(p - 1) * N // p] * p


@pytest.mark.parametrize("p", WORLD_SIZES)
def test_broadcast_and_its_pipelined_ring_bytes(p):
    src = p - 1
    xs = per_rank(p, (5,))
    res = ts.run(call("broadcast", src=src), xs, world_size=p)
    for out in res.outputs:
        assert torch.equal(out, xs[src])
    N = 5 * 8
    # The ring starts at the root: it only sends, the rank just before it only receives.
    last = (src - 1) % p
    assert sent(res) == [0 if p == 1 or r == last else N for r in range(p)]
    assert received(res) == [0 if p == 1 or r == src else N for r in range(p)]


@pytest.mark.parametrize("p", WORLD_SIZES)
@pytest.mark.parametrize("scatter_dim,gather_dim", [(0, 1), (1, 0), (1, 1), (0, 0)])
def test_all_to_all(p, scatter_dim, gather_dim):
    shape = [2 * p, 3 * p]
    xs = per_rank(p, tuple(shape))
    res = ts.run(call("all_to_all", scatter_dim=scatter_dim, gather_dim=gather_dim), xs, world_size=p)
    for r, out in enumerate(res.outputs):
        expected = torch.cat([xs[j].chunk(p, scatter_dim)[r] for j in range(p)], gather_dim)
        assert torch.equal(out, expected)
    N = xs[0].numel() * 8
    assert sent(res) == received(res) == [(p - 1) * N // p] * p


@pytest.mark.parametrize("p", WORLD_SIZES)
def test_ring_shift_with_sendrecv_isend_irecv_and_blocking_pairs(p):
    xs = per_rank(p, (3,))

    def fn(comm, xs):
        right, left = (comm.rank + 1) % comm.world_size, (comm.rank - 1) % comm.world_size
        x = xs[comm.rank]
        shifted = comm.sendrecv(x, dst=right, src=left)
        handles = [comm.irecv(x, src=left), comm.isend(x, dst=right)]
        asynchronous = handles[0].wait()
        handles[1].wait()
        if comm.world_size > 1 and comm.rank % 2 == 0:  # even ranks send first: no deadlock
            comm.send(x, right)
            blocking = comm.recv(x, left)
        elif comm.world_size > 1:
            blocking = comm.recv(x, left)
            comm.send(x, right)
        else:
            blocking = x.clone()
        return shifted, asynchronous, blocking

    if p == 1:
        with pytest.raises(ValueError, match="dst=0 must be another rank"):
            ts.run(fn, xs, world_size=1)
        return
    res = ts.run(fn, xs, world_size=p)
    for r, outs in enumerate(res.outputs):
        for out in outs:
            assert torch.equal(out, xs[(r - 1) % p])
    n = 3 * 8
    assert sent(res) == received(res) == [3 * n] * p
    assert res.trace.count(op="send", blocking=False) == p
    assert len(res.trace.waits) == 2 * p


def test_outputs_are_owned_by_each_rank():
    """No rank's result shares memory with another rank's result or with any input."""
    xs = per_rank(4, (4, 4))

    def fn(comm, xs):
        x = xs[comm.rank]
        return [comm.all_gather(x), comm.all_reduce(x), comm.broadcast(x, 0), comm.reduce_scatter(x),
                comm.all_to_all(x, 0, 1), comm.sendrecv(x, (comm.rank + 1) % 4, (comm.rank - 1) % 4)]

    res = ts.run(fn, xs, world_size=4)
    pointers = [t.untyped_storage().data_ptr() for outs in res.outputs for t in outs]
    pointers += [x.untyped_storage().data_ptr() for x in xs]
    assert len(set(pointers)) == len(pointers)


def test_reductions_are_in_rank_order_and_bitwise_reproducible():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1000, generator=g, dtype=torch.float32) * 10 ** (i % 5) for i in range(8)]
    in_order = xs[0].clone()
    for x in xs[1:]:
        in_order += x
    runs = [ts.run(call("all_reduce"), xs, world_size=8).outputs for _ in range(3)]
    for outputs in runs:
        for out in outputs:
            assert torch.equal(out, in_order)


def test_subgroups_of_a_2x2_mesh():
    """Rows {0,1},{2,3} all-reduce; events name the subgroup's global ranks; non-members get None."""
    def fn(comm):
        rows = [comm.new_group([0, 1]), comm.new_group([2, 3])]
        row = rows[comm.rank // 2]
        assert rows[1 - comm.rank // 2] is None
        assert (row.rank, row.world_size, row.global_rank) == (comm.rank % 2, 2, comm.rank)
        x = torch.full((2,), float(comm.rank))
        return row.all_reduce(x), row.sendrecv(x, 1 - row.rank, 1 - row.rank)

    res = ts.run(fn, world_size=4)
    assert [o[0][0].item() for o in res.outputs] == [1.0, 1.0, 5.0, 5.0]
    assert [o[1][0].item() for o in res.outputs] == [1.0, 0.0, 3.0, 2.0]
    groups = {e.rank: e.group for e in res.trace.filter(op="all_reduce").events}
    assert groups == {0: (0, 1), 1: (0, 1), 2: (2, 3), 3: (2, 3)}
    assert {e.rank: e.peer for e in res.trace.filter(op="send").events} == {0: 1, 1: 0, 2: 3, 3: 2}


def test_scopes_nest_and_events_carry_the_contract_fields():
    def fn(comm):
        x = torch.ones(4, dtype=torch.bfloat16)
        with comm.scope("block0"):
            with comm.scope("attn"):
                comm.all_reduce(x)
            comm.all_gather(x)
        comm.barrier()

    res = ts.run(fn, world_size=2)
    e = res.trace.filter(rank=1, op="all_reduce").events[0]
    assert (e.op, e.rank, e.group, e.shape, e.dtype, e.nbytes) == ("all_reduce", 1, (0, 1), (4,), torch.bfloat16, 8)
    assert (e.sent_bytes, e.recv_bytes, e.scope, e.phase) == (8, 8, "block0/attn", "forward")
    assert [e.scope for e in res.trace.filter(rank=0).events] == ["block0/attn", "block0", ""]
    assert res.trace.total(scope="block0") == 2 * (8 + 8)
    assert res.trace.ops() == {"all_reduce": 2, "all_gather": 2, "barrier": 2}


@pytest.mark.parametrize("bad, message", [
    (lambda c: c.reduce_scatter(torch.ones(5, 2), dim=0), r"rank \d of group \(0, 1, 2\): reduce_scatter: size 5 of dim=0 \(shape \(5, 2\)\) is not divisible by world_size 3"),
    (lambda c: c.all_to_all(torch.ones(4, 5), 1, 0), r"all_to_all: size 5 of scatter_dim=1 .* not divisible by world_size 3"),
    (lambda c: c.all_gather(torch.ones(4), dim=2), r"all_gather got dim=2 for a tensor of shape \(4,\)"),
    (lambda c: c.send(torch.ones(1), 3), r"send: dst=3 must be another rank in \[0, 3\)"),
    (lambda c: c.all_reduce(torch.ones(1), op="mean"), r"unknown reduce op 'mean'"),
    (lambda c: c.new_group([0, 0]), r"new_group needs distinct ranks"),
])
def test_bad_arguments_raise_value_errors_with_the_numbers(bad, message):
    with pytest.raises(ValueError, match=message):
        ts.run(lambda comm: bad(comm), world_size=3)


def test_count_flops_records_compute_between_communications():
    def fn(comm):
        a = torch.ones(8, 16)
        b = a @ torch.ones(16, 4)  # 2*8*16*4 FLOPs
        comm.all_reduce(b)
        return b @ torch.ones(4, 2)  # 2*8*4*2 FLOPs after the last collective

    res = ts.run(fn, world_size=2, count_flops=True)
    spans = res.trace.compute
    assert [(c.rank, c.flops) for c in spans] == [(0, 1024), (0, 128), (1, 1024), (1, 128)]
    ev = res.trace.filter(rank=0).events[0]
    assert spans[0].seq < ev.seq < spans[1].seq


# ---- properties over random shapes, dims and world sizes ----------------------------------------

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3)


@settings(max_examples=40, deadline=None)
@given(p=st.integers(1, 6), shape=shapes, data=st.data())
def test_property_gather_scatter_and_all_to_all_agree_with_chunk_and_cat(p, shape, data):
    dim = data.draw(st.integers(0, len(shape) - 1))
    other = data.draw(st.integers(0, len(shape) - 1))
    full_shape = list(shape)
    full_shape[dim] *= p
    xs = per_rank(p, tuple(full_shape), seed=data.draw(st.integers(0, 100)))

    def fn(comm, xs):
        x = xs[comm.rank]
        reduced = comm.reduce_scatter(x, dim)
        return (comm.all_gather(reduced, dim), comm.all_reduce(x), comm.all_to_all(x, dim, other),
                comm.all_to_all(comm.all_to_all(x, dim, other), other, dim))

    res = ts.run(fn, xs, world_size=p)
    for r, (gathered, reduced, swapped, round_trip) in enumerate(res.outputs):
        # reduce_scatter + all_gather is an all_reduce, on the wire as in the result
        assert torch.equal(gathered, reduced)
        assert torch.equal(swapped, torch.cat([xs[j].chunk(p, dim)[r] for j in range(p)], other))
        if dim != other or p == 1:
            assert torch.equal(round_trip, xs[r])
        assert (res.trace.total(rank=r, op="reduce_scatter") + res.trace.total(rank=r, op="all_gather")
                == res.trace.total(rank=r, op="all_reduce"))


def test_no_thread_outlives_a_run():
    before = threading.active_count()
    for p in WORLD_SIZES:
        ts.run(call("all_reduce"), per_rank(p, (2,)), world_size=p)
    assert threading.active_count() == before


def test_flops_at_the_end_of_a_forward_are_booked_to_the_forward():
    """The forward's last matmul comes after its last collective: it must not be labelled backward."""
    def fn(comm):
        w = torch.ones(4, 4, requires_grad=True)
        with comm.scope("layer"):
            h = ts.mappings.f(torch.ones(2, 4), comm) @ w  # forward: 2*2*4*4 = 64 FLOPs
        h.sum().backward()  # backward: dW = x^T·g, 64 FLOPs (x needs no grad, so f's all-reduce never runs)
        return w.grad

    res = ts.run(fn, world_size=2, count_flops=True)
    spans = [(c.scope, c.phase, c.flops) for c in res.trace.compute if c.rank == 0]
    assert spans == [("layer", "forward", 64), ("", "backward", 64)]


def test_subgroups_created_at_the_same_time_by_disjoint_groups_get_their_own_ranks():
    """Eight pairs each split themselves again at once: every new communicator names its own pair."""
    def fn(comm):
        pairs = [comm.new_group([2 * i, 2 * i + 1]) for i in range(8)]
        pair = pairs[comm.rank // 2]
        return [pair.new_group([0, 1]).group for _ in range(5)]

    for _ in range(3):
        res = ts.run(fn, world_size=16)
        for rank, groups in enumerate(res.outputs):
            assert groups == [(rank - rank % 2, rank - rank % 2 + 1)] * 5
