"""Adding a collective is one entry of the op table (core/ops.py): a reduce to a root, declared here as one
``Op`` and nothing else, runs through ``comm.collective`` on virtual ranks, on one rank alone and on gloo,
with its arguments checked, its bytes recorded and its time priced.

The toy's wire bytes, a pipelined chain ending at the root (the mirror of broadcast's), in closed form:
on p >= 2 ranks, the rank at distance d = (rank - root) mod p from the root sends N unless it is the root
(d = 0) and receives N unless it starts the chain (d = 1); p - 1 latency steps; nothing on one rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import tpsp_sim as ts
from tpsp_sim.core import ops
from tpsp_sim.sim.solo import run_solo

HW = ts.Hardware("toy link", link_bandwidth=2e9, latency=3e-6, peak_flops=1e12)


def toy_reduce() -> ops.Op:
    """``reduce``: the root gets the reduction of every rank's input, the other ranks None (as
    ``torch.distributed.reduce``). Built in a function: cloudpickle sends its closures to gloo's workers."""
    reductions = {"sum": lambda s: s.sum(0), "avg": lambda s: s.sum(0) / len(s), "max": lambda s: s.amax(0),
                  "min": lambda s: s.amin(0), "prod": lambda s: s.prod(0)}

    def wire(nbytes: int, p: int, position: int) -> tuple[int, int]:
        return (0 if position == 0 else nbytes), (0 if position == 1 else nbytes)

    def outputs(xs: list[torch.Tensor], dst: int, op: str) -> list[torch.Tensor | None]:
        return [reductions[op](torch.stack(xs)) if r == dst else None for r in range(len(xs))]

    def torch_call(pg, x, dst, op, *, async_op):
        out = x.detach().clone()
        work = dist.reduce(out, dst=dist.get_global_rank(pg, dst), group=pg, async_op=async_op,
                           op=getattr(dist.ReduceOp, ops.REDUCE_OPS["sum" if op == "avg" else op]))
        return work, lambda: (out / pg.size() if op == "avg" else out) if pg.rank() == dst else None

    return ops.Op("reduce", (ops.Param("dst", "root", 0), ops.Param("op", "reduce op", "sum")), wire,
                  lambda p: p - 1, "#8dd3c7", outputs, torch_call)


@pytest.fixture
def reduce_op(monkeypatch) -> ops.Op:
    op = toy_reduce()
    monkeypatch.setitem(ops.OPS, op.name, op)
    return op


def per_rank(p: int) -> list[torch.Tensor]:
    """Different integer-valued float64 data on every rank (its sum is exact in any order)."""
    g = torch.Generator().manual_seed(p)
    return [torch.randint(-9, 10, (3, 2), generator=g).to(torch.float64) for _ in range(p)]


def closed_form(p: int, rank: int, dst: int, nbytes: int) -> tuple[int, int]:
    """(sent, received) of the module docstring."""
    if p == 1:
        return 0, 0
    d = (rank - dst) % p
    return (0 if d == 0 else nbytes), (0 if d == 1 else nbytes)


def reduce_each_way(comm, xs, dst):
    """The toy by position, by name, and posted asynchronously; then a named collective after it."""
    x = xs[comm.rank]
    blocking = comm.collective("reduce", x, dst)
    named = comm.collective("reduce", x, op="max", dst=dst)
    posted = comm.collective("reduce", x, dst, async_op=True)
    after = comm.all_reduce(x)
    return blocking, named, posted.wait(), after


@pytest.mark.parametrize("p, dst", [(1, 0), (2, 1), (3, 0), (3, 2), (5, 3)])
def test_a_collective_declared_only_in_the_op_table_runs_on_virtual_ranks(reduce_op, p, dst):
    xs = per_rank(p)
    res = ts.run(reduce_each_way, xs, dst, world_size=p)
    total, largest = sum(xs), torch.stack(xs).amax(0)
    for rank, (blocking, named, posted, after) in enumerate(res.outputs):
        if rank == dst:
            assert torch.equal(blocking, total) and torch.equal(named, largest) and torch.equal(posted, total)
        else:
            assert blocking is None and named is None and posted is None
        assert torch.equal(after, total)
    events = res.trace.filter(op="reduce").events
    assert len(events) == 3 * p and [e.blocking for e in events[:3]] == [True, True, False]
    for e in events:
        assert (e.sent_bytes, e.recv_bytes) == closed_form(p, e.rank, dst, 48)  # 6 float64
        want = 0.0 if p == 1 else (p - 1) * 3e-6 + 48 / 2e9  # latency steps · α + N / B
        assert ts.cost.estimate(res.trace, HW).of(e) == pytest.approx(want, rel=1e-12, abs=0)
    assert len(res.trace.waits) == p  # the async call's wait


@pytest.mark.parametrize("p, rank, dst", [(4, 0, 0), (4, 1, 0), (4, 2, 3), (7, 5, 2)])
def test_the_one_rank_comm_runs_it_and_records_the_same_bytes(reduce_op, p, rank, dst):
    def fn(comm):
        return comm.collective("reduce", torch.empty(5, 4, device="meta"), dst=dst)

    trace = run_solo(fn, world_size=p, rank=rank)
    [e] = trace.events
    assert (e.op, e.rank, e.nbytes) == ("reduce", rank, 80)
    assert (e.sent_bytes, e.recv_bytes) == closed_form(p, rank, dst, 80)


@pytest.mark.parametrize("args, kwargs, message", [
    ((3,), {}, r"^rank 0 of group \(0, 1, 2\): reduce: dst=3 must be a rank in \[0, 3\)$"),
    ((), {"dst": 1.0}, r"reduce: dst must be an integer rank, got 1.0 \(float\)"),
    ((), {"op": "mean"}, r"reduce: unknown reduce op 'mean'"),
    ((0, "sum", 1), {}, r"reduce takes 2 argument\(s\) after the tensor \('dst', 'op'\), got 3"),
])
def test_its_arguments_are_checked_as_their_kinds_say(reduce_op, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_solo(lambda comm: comm.collective("reduce", torch.ones(2, device="meta"), *args, **kwargs), world_size=3)


def test_ranks_naming_different_roots_are_a_mismatch(reduce_op):
    with pytest.raises(ts.CollectiveMismatchError, match=r"reduce\(shape=\(2,\), dtype=torch.float32, dst=0, "
                                                         r"op='sum'\)(.|\n)*dst=1, op='sum'"):
        ts.run(lambda comm: comm.collective("reduce", torch.ones(2), comm.rank % 2), world_size=3)


@pytest.mark.real
@pytest.mark.timeout(120)
def test_it_runs_on_gloo_with_the_simulators_results_and_trace(reduce_op):
    toy, xs = reduce_op, per_rank(3)

    def fn(comm, toy, xs, dst):
        ops.OPS[toy.name] = toy  # this worker process's own table gets the entry the test declared
        return reduce_each_way(comm, xs, dst)

    real = ts.run(fn, toy, xs, 2, world_size=3, backend="gloo", timeout=60)
    sim = ts.run(fn, toy, xs, 2, world_size=3)
    for got, want in zip(real.outputs, sim.outputs):
        assert all((g is None and w is None) or torch.equal(g, w) for g, w in zip(got, want))
    assert sim.outputs[2][0] is not None

    def calls(trace):
        return [(e.op, e.rank, e.shape, e.sent_bytes, e.recv_bytes, e.blocking) for e in trace.events]
    assert calls(real.trace) == calls(sim.trace)
    assert len(real.trace.filter(op="reduce").events) == 9
