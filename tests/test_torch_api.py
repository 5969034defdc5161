"""torch.distributed on virtual ranks (``ts.run(..., torch_distributed=True)``): every dist.* call exact
against a dense computation from all ranks' inputs, recorded with the closed-form bytes of ops.py,
failing with the simulator's errors, and torch's process-wide state restored when the run ends."""

import sys
import threading
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.distributed_c10d as c10d
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import tpsp_sim as ts
from tpsp_sim.core.ops import wire_bytes

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch 2.13 renames *_into_tensor / *_tensor


def rank_input(rank, shape=(6, 2)):
    """A float64 tensor that differs on every rank (and from every rank's), reproducible without a shared RNG."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def run(fn, p, **kwargs):
    return ts.run(fn, world_size=p, torch_distributed=True, **kwargs)


DENSE_REDUCE = {dist.ReduceOp.SUM: lambda xs: sum(xs[1:], xs[0].clone()),
                dist.ReduceOp.AVG: lambda xs: sum(xs[1:], xs[0].clone()) / len(xs),
                dist.ReduceOp.MAX: lambda xs: torch.stack(xs).amax(0),
                dist.ReduceOp.MIN: lambda xs: torch.stack(xs).amin(0),
                dist.ReduceOp.PRODUCT: lambda xs: torch.stack(xs).prod(0)}


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_rank_world_size_and_every_reduce_op_in_place(p):
    def fn(comm):
        out = {}
        for op in DENSE_REDUCE:
            x = rank_input(dist.get_rank())
            assert dist.all_reduce(x, op=op) is None  # in place, like torch
            out[op] = x
        return dist.get_rank(), dist.get_world_size(), out

    res = run(fn, p)
    xs = [rank_input(r) for r in range(p)]
    for r, (rank, size, out) in enumerate(res.outputs):
        assert (rank, size) == (r, p)
        for op, dense in DENSE_REDUCE.items():
            torch.testing.assert_close(out[op], dense(xs), rtol=1e-13, atol=1e-13)
    n = xs[0].numel() * 8
    assert res.trace.total("sent_bytes", op="all_reduce", rank=0) == len(DENSE_REDUCE) * wire_bytes("all_reduce", n, p)[0]


@pytest.mark.parametrize("p", [2, 3])
def test_gathers_scatters_and_all_to_all_equal_dense(p):
    def fn(comm):
        r, x = dist.get_rank(), rank_input(dist.get_rank())
        cat, stack = torch.empty(6 * p, 2, dtype=x.dtype), torch.empty(p, 6, 2, dtype=x.dtype)
        dist.all_gather_into_tensor(cat, x)
        dist.all_gather_into_tensor(stack, x)  # the stacked output form c10d also accepts
        pieces = [torch.empty_like(x) for _ in range(p)]
        dist.all_gather(pieces, x)
        big = rank_input(r, (3 * p, 2))
        rs, rs_avg = torch.empty(3, 2, dtype=x.dtype), torch.empty(3, 2, dtype=x.dtype)
        dist.reduce_scatter_tensor(rs, big)
        dist.reduce_scatter_tensor(rs_avg, big, op=dist.ReduceOp.AVG)
        rs_list = torch.empty(3, 2, dtype=x.dtype)
        dist.reduce_scatter(rs_list, list(big.chunk(p)))
        a2a = torch.empty_like(big)
        dist.all_to_all_single(a2a, big)
        a2a_list = [torch.empty(3, 2, dtype=x.dtype) for _ in range(p)]
        dist.all_to_all(a2a_list, list(big.chunk(p)))
        b = x.clone()
        dist.broadcast(b, src=p - 1)
        scattered = torch.empty(2, dtype=x.dtype)
        dist.scatter(scattered, list(torch.arange(2. * p, dtype=x.dtype).view(p, 2) + 10 * r) if r == 0 else None, src=0)
        gathered = [torch.empty_like(x) for _ in range(p)] if r == 1 else None
        dist.gather(x, gathered, dst=1)
        dist.barrier()
        return cat, stack, pieces, rs, rs_avg, rs_list, a2a, a2a_list, b, scattered, gathered

    res = run(fn, p)
    xs, bigs = [rank_input(r) for r in range(p)], [rank_input(r, (3 * p, 2)) for r in range(p)]
    total = sum(bigs[1:], bigs[0].clone())
    for r, (cat, stack, pieces, rs, rs_avg, rs_list, a2a, a2a_list, b, scattered, gathered) in enumerate(res.outputs):
        assert torch.equal(cat, torch.cat(xs)) and torch.equal(stack, torch.stack(xs))
        assert all(torch.equal(a, b_) for a, b_ in zip(pieces, xs))
        torch.testing.assert_close(rs, total.chunk(p)[r], rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(rs_avg, total.chunk(p)[r] / p, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(rs_list, total.chunk(p)[r], rtol=1e-14, atol=1e-14)
        assert torch.equal(a2a, torch.cat([bigs[j].chunk(p)[r] for j in range(p)]))
        assert all(torch.equal(a2a_list[j], bigs[j].chunk(p)[r]) for j in range(p))
        assert torch.equal(b, xs[p - 1])
        assert torch.equal(scattered, torch.arange(2. * r, 2. * r + 2, dtype=torch.float64))
        assert (gathered is None) == (r != 1) and (r != 1 or all(torch.equal(g, x) for g, x in zip(gathered, xs)))
    n, trace = 6 * 2 * 8, res.trace
    assert trace.total("sent_bytes", op="all_gather", rank=0) == 3 * wire_bytes("all_gather", n, p)[0]
    assert trace.total("sent_bytes", op="reduce_scatter", rank=0) == 3 * wire_bytes("reduce_scatter", n * p // 2, p)[0]
    assert trace.total("sent_bytes", op="all_to_all", rank=0) == 2 * wire_bytes("all_to_all", n * p // 2, p)[0]
    # scatter: the root sends p-1 pieces of 2 doubles; gather: every rank but the root sends its x
    assert trace.total("sent_bytes", op="send", rank=0) == (p - 1) * 16 + n
    assert trace.total("recv_bytes", op="recv", rank=1) == 16 + (p - 1) * n


@settings(max_examples=15, deadline=None)
@given(p=st.integers(1, 5), rows=st.integers(1, 3), cols=st.integers(1, 4), src=st.integers(0, 4))
def test_tensor_collectives_on_any_world_size_and_shape(p, rows, cols, src):
    src %= p

    def fn(comm):
        x = rank_input(dist.get_rank(), (rows * p, cols))
        gathered, scattered, exchanged, b = torch.empty(rows * p * p, cols, dtype=x.dtype), \
            torch.empty(rows, cols, dtype=x.dtype), torch.empty_like(x), x.clone()
        dist.all_gather_into_tensor(gathered, x)
        dist.reduce_scatter_tensor(scattered, x)
        dist.all_to_all_single(exchanged, x)
        dist.broadcast(b, src=src)
        return gathered, scattered, exchanged, b

    res = run(fn, p)
    xs = [rank_input(r, (rows * p, cols)) for r in range(p)]
    total = sum(xs[1:], xs[0].clone())
    for r, (gathered, scattered, exchanged, b) in enumerate(res.outputs):
        assert torch.equal(gathered, torch.cat(xs)) and torch.equal(b, xs[src])
        torch.testing.assert_close(scattered, total.chunk(p)[r], rtol=1e-14, atol=1e-14)
        assert torch.equal(exchanged, torch.cat([xs[j].chunk(p)[r] for j in range(p)]))
    n = rows * p * cols * 8
    for op, nbytes in (("all_gather", n), ("reduce_scatter", n), ("all_to_all", n), ("broadcast", n)):
        assert res.trace.total("sent_bytes", op=op, rank=(src + 1) % p) == wire_bytes(op, nbytes, p, (src + 1) % p, src)[0]


@pytest.mark.parametrize("p", [2, 3])
def test_point_to_point_and_async_handles(p):
    def fn(comm):
        r = dist.get_rank()
        x = rank_input(r, (4,))
        got = torch.empty(4, dtype=x.dtype)
        ops = [dist.P2POp(dist.isend, x, (r + 1) % p), dist.P2POp(dist.irecv, got, (r - 1) % p)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        back = torch.empty(4, dtype=x.dtype)
        recv = dist.irecv(back, src=(r + 1) % p)  # posted first: the isend below cannot meet a blocked peer
        send = dist.isend(x * 2, dst=(r - 1) % p)
        send.wait(), recv.wait()
        if r == 0:
            dist.send(x, dst=1)
        elif r == 1:
            assert dist.recv(got2 := torch.empty(4, dtype=x.dtype), src=0) == 0
            assert torch.equal(got2, rank_input(0, (4,)))
        work = dist.all_reduce(summed := x.clone(), async_op=True)
        work.wait()
        return got, back, summed

    res = run(fn, p)
    xs = [rank_input(r, (4,)) for r in range(p)]
    for r, (got, back, summed) in enumerate(res.outputs):
        assert torch.equal(got, xs[(r - 1) % p]) and torch.equal(back, 2 * xs[(r + 1) % p])
        torch.testing.assert_close(summed, sum(xs[1:], xs[0].clone()), rtol=1e-14, atol=1e-14)
    sends = [e for e in res.trace.events if e.op == "send" and e.rank == 0]
    assert [(e.peer, e.blocking, e.sent_bytes) for e in sends] == [(1 % p, False, 32), (p - 1, False, 32), (1, False, 32)]
    # every isend / irecv handle waited on, and the async all_reduce's
    assert len([w for w in res.trace.waits if w.rank == 0]) == 6


def test_functional_collectives_and_scopes():
    """DTensor's path: C++ resolves the group by name in this rank's registry and calls back into Python."""
    def fn(comm):
        x = rank_input(dist.get_rank())
        with comm.scope("funcol"):
            s = funcol.all_reduce(x, "sum", dist.group.WORLD)
            g = funcol.all_gather_tensor(x, 0, dist.group.WORLD)
            rs = funcol.reduce_scatter_tensor(x, "sum", 0, dist.group.WORLD)
        return funcol.wait_tensor(s), funcol.wait_tensor(g), funcol.wait_tensor(rs)

    res = run(fn, 3)
    xs = [rank_input(r) for r in range(3)]
    total = sum(xs[1:], xs[0].clone())
    for r, (s, g, rs) in enumerate(res.outputs):
        torch.testing.assert_close(s, total, rtol=1e-14, atol=1e-14)
        assert torch.equal(g, torch.cat(xs))
        torch.testing.assert_close(rs, total.chunk(3)[r], rtol=1e-14, atol=1e-14)
    assert [e.op for e in res.trace.events if e.rank == 0] == ["all_reduce", "all_gather", "reduce_scatter"]
    assert {e.scope for e in res.trace.events} == {"funcol"}


def test_device_mesh_groups_and_axes_match_the_package_mesh():
    """init_device_mesh's groups are the package's (last dim fastest), and each call records its dim's name."""
    def fn(comm):
        mesh = init_device_mesh("cpu", (2, 3), mesh_dim_names=("dp", "tp"))
        mine = ts.init_device_mesh(comm, (2, 3), mesh_dim_names=("dp", "tp"))
        for axis in ("dp", "tp"):
            assert mesh.get_local_rank(axis) == mine.get_local_rank(axis)
            assert tuple(dist.get_process_group_ranks(mesh.get_group(axis))) == mine[axis].group
        x = torch.ones(2, dtype=torch.float64)
        dist.all_reduce(x, group=mesh.get_group("tp"))
        dist.all_reduce(x, group=mesh.get_group("dp"))
        return x

    res = run(fn, 6)
    assert all(torch.equal(x, torch.full((2,), 6.0, dtype=torch.float64)) for x in res.outputs)
    calls = [(e.axis, e.group) for e in res.trace.events if e.rank == 4 and e.op == "all_reduce"]
    assert calls == [("tp", (3, 4, 5)), ("dp", (1, 4))]


def test_a_3d_mesh_and_its_flattened_axes_record_the_packages_axis_names():
    def fn(comm):
        mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("dp", "cp", "tp"))
        flat = mesh["dp", "cp"]._flatten()  # torchtitan's dp x cp group for the gradient reduction
        mine = ts.init_device_mesh(comm, (2, 2, 2), mesh_dim_names=("dp", "cp", "tp"))
        assert tuple(dist.get_process_group_ranks(flat.get_group())) == mine["dp", "cp"].group
        x = torch.ones(1)
        for group in (flat.get_group(), *(mesh.get_group(a) for a in ("dp", "cp", "tp"))):
            dist.all_reduce(x, group=group)
        return x

    res = run(fn, 8)
    assert all(x.item() == 4 * 2 * 2 * 2 for x in res.outputs)
    assert [(e.axis, e.group) for e in res.trace.events if e.rank == 5] == [
        ("dp_cp", (1, 3, 5, 7)), ("dp", (1, 5)), ("cp", (5, 7)), ("tp", (4, 5))]


def _torch_state():
    return (c10d._world, c10d._backend, c10d._default_pg_init_method, sys.excepthook, list(dist.Backend.backend_list),
            dict(dist.Backend._plugins), dict(dist.Backend.backend_type_map), hasattr(dist.Backend, "TPSP_SIM"))


def test_torch_state_is_restored_however_the_run_ends():
    before = _torch_state()

    def failing(comm):
        dist.all_reduce(torch.ones(1))
        if dist.get_rank() == 1:
            raise KeyError("boom")
        dist.barrier()

    def stopped_while_computing(comm):
        init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        if dist.get_rank() == 1:
            raise KeyError("boom")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # Python that never reaches a Comm call: stopped by an Aborted
            pass

    def deadlocked(comm):
        dist.recv(torch.empty(1), src=1 - dist.get_rank())

    for fn, p, error in ((failing, 3, KeyError), (stopped_while_computing, 4, KeyError),
                         (deadlocked, 2, ts.DeadlockError)):
        with pytest.raises(error):
            run(fn, p)
        assert _torch_state() == before and not dist.is_initialized()
    with pytest.raises(ValueError, match="^Default process group has not been initialized") as outside:
        dist.all_reduce(torch.ones(1))  # outside a run: torch's own error, with a note of ours
    assert outside.value.__notes__ == [NOT_A_RANK]
    res = run(lambda comm: dist.get_world_size(), 2)  # the next run starts clean
    assert res.outputs == [2, 2] and _torch_state() == before
    assert [t.name for t in threading.enumerate() if t.name.startswith("tpsp_sim")] == []


NOT_A_RANK = ("tpsp_sim: not inside ts.run: this thread is no rank of a run; dist.* calls have a default group "
              "only in the rank threads that ts.run(fn, world_size=N, torch_distributed=True) starts for fn (a "
              "real process gets one from dist.init_process_group)")


def test_without_the_flag_ranks_have_no_default_group_and_the_error_says_how_to_get_one():
    with pytest.raises(ValueError, match="Default process group has not been initialized") as caught:
        ts.run(lambda comm: dist.get_rank(), world_size=2)
    assert caught.value.__notes__ == ["tpsp_sim: inside ts.run without torch_distributed=True: pass "
                                      "torch_distributed=True, and every rank gets an initialised torch.distributed "
                                      "default group for its dist.* calls"]
    assert caught.value.__cause__.__notes__ == caught.value.__notes__  # the rank's own error got it first


def test_a_thread_of_fn_or_a_destroyed_group_is_told_where_it_stands():
    """A thread fn starts is no rank; a rank that destroyed its default group is told so."""
    def fn(comm):
        caught = []

        def thread():
            try:
                dist.get_rank()
            except ValueError as error:
                caught.append(error.__notes__)

        worker = threading.Thread(target=thread)
        worker.start()
        worker.join()
        dist.destroy_process_group()
        try:
            dist.barrier()
        except ValueError as error:
            caught.append(error.__notes__)
        return caught

    assert run(fn, 2).outputs == [[[NOT_A_RANK], ["tpsp_sim: this rank's default group was destroyed inside fn "
                                                  "(dist.destroy_process_group)"]]] * 2
    assert not dist.is_initialized()


def test_the_note_leaves_torchs_function_and_an_existing_default_group_alone():
    """The wrapper returns torch's group where one exists (a gloo process's is tested in test_torch_api_real)."""
    assert c10d._get_default_group.__wrapped__ is c10d._get_default_group.tpsp_sim_wraps
    assert c10d._get_default_group.tpsp_sim_wraps.__module__ == "torch.distributed.distributed_c10d"
    assert run(lambda comm: c10d._get_default_group() is dist.group.WORLD, 2).outputs == [True, True]


def test_mismatch_and_deadlock_are_the_simulators():
    def mismatched(comm):
        x = torch.ones(4)
        if dist.get_rank() == 0:
            dist.all_reduce(x)
        else:
            dist.all_gather_into_tensor(torch.empty(8), x)

    with pytest.raises(ts.CollectiveMismatchError, match=r"(?s)rank 0: all_reduce.*rank 1: all_gather"):
        run(mismatched, 2)

    def both_receive(comm):
        dist.recv(torch.empty(2), src=1 - dist.get_rank())

    with pytest.raises(ts.DeadlockError, match="recv from rank"):
        run(both_receive, 2)


@pytest.mark.parametrize("call, message", [
    (lambda: dist.all_reduce(torch.ones(2, dtype=torch.int64), op=dist.ReduceOp.BAND), r"ReduceOp\.BAND"),
    (lambda: dist.reduce(torch.ones(2), dst=0), "reduce is not supported"),
    (lambda: dist.all_to_all_single(torch.empty(3), torch.ones(3), [1, 2], [2, 1]), "uneven split sizes"),
    (lambda: dist.send(torch.ones(2), dst=1 - dist.get_rank(), tag=7), "tag=7"),
    (lambda: dist.all_gather_into_tensor(torch.empty(5), torch.ones(2)), r"output of shape \(5,\).*input of shape \(2,\)"),
    (lambda: dist.reduce_scatter_tensor(torch.empty(1, dtype=torch.float64), torch.ones(2)), "torch.float64.*torch.float32"),
    (lambda: dist.all_gather([torch.empty(3)], torch.ones(3)),  # silently gathered one rank's piece before
     r"all_gather got 1 output tensor\(s\) of shapes \[\(3,\)\] \(torch.float32\); with an input of shape \(3,\) "
     r"\(torch.float32\) on 2 ranks it needs 2 output tensors of that size and dtype"),
    (lambda: dist.all_gather([torch.empty(2), torch.empty(2, dtype=torch.int64)], torch.ones(2)), r"int64"),
    (lambda: dist.reduce_scatter(torch.empty(2), [torch.ones(2)] * 3), "reduce_scatter got 3 input tensor"),
    (lambda: dist.all_to_all([torch.empty(1)] * 2, [torch.ones(1)]), "all_to_all got 1 input tensor"),
    (lambda: dist.scatter(torch.empty(2), [torch.ones(2)] if dist.get_rank() == 0 else None, src=0),  # a deadlock
     r"^rank 0 raised ValueError: rank 0 of group \(0, 1\): scatter got 1 input tensor"),
    (lambda: dist.gather(torch.ones(2), [torch.empty(2)] * 3 if dist.get_rank() == 0 else None, dst=0),
     r"^rank 0 raised ValueError: rank 0 of group \(0, 1\): gather got 3 output tensor"),
])
def test_unsupported_or_misfitting_calls_are_named(call, message):
    with pytest.raises((ValueError, NotImplementedError), match=message):
        run(lambda comm: call(), 2)


def test_a_group_used_from_another_rank_or_after_its_run():
    """c10d itself refuses another rank's group (each rank has its own world); called directly, so does the group."""
    shared = {}

    def fn(comm, direct):
        if dist.get_rank() == 0:
            shared["group"] = dist.group.WORLD
        dist.barrier()
        if dist.get_rank() == 1:
            if direct:
                shared["group"].allreduce([torch.ones(1)])
            else:
                dist.all_reduce(torch.ones(1), group=shared["group"])

    with pytest.raises(ValueError, match=r"CommProcessGroup\(rank=0, size=2, group=\(0, 1\)\) is not initialized"):
        run(fn, 2, direct=False)
    with pytest.raises(ts.SimulationError, match="process group of rank 0.*used from another thread"):
        run(fn, 2, direct=True)
    kept = run(lambda comm: dist.group.WORLD, 2).outputs[0]
    with pytest.raises(ts.SimulationError, match="process group of rank 0"):
        kept.allreduce([torch.ones(1)])

    def makes_a_dtensor(comm):
        mesh = init_device_mesh("cpu", (2,))
        return mesh, distribute_tensor(torch.arange(4.0), mesh, [Shard(0)])

    mesh, dtensor = run(makes_a_dtensor, 2).outputs[0]
    for use in (mesh.get_group, dtensor.full_tensor):  # torch's C++ registry: the README quotes this message
        with pytest.raises(RuntimeError, match="^Could not resolve the process group registered under the name 0$"):
            use()


def test_a_backend_registered_during_a_run_is_kept_after_it():
    """The run puts back only its own entries (torch.testing's "fake" backend, say, may be imported meanwhile)."""
    def fn(comm):
        if dist.get_rank() == 0:
            dist.Backend.register_backend("tpsp_test_other", lambda *args: None, devices=["cpu"])

    try:
        run(fn, 2)
        assert "tpsp_test_other" in dist.Backend.backend_list and "TPSP_TEST_OTHER" in dist.Backend._plugins
        assert "tpsp_sim" not in dist.Backend.backend_list and not hasattr(dist.Backend, "TPSP_SIM")
    finally:
        dist.Backend.backend_list.remove("tpsp_test_other")
        for table, key in ((dist.Backend._plugins, "TPSP_TEST_OTHER"), (dist.Backend.backend_type_map, "tpsp_test_other"),
                           (dist.Backend.backend_capability, "tpsp_test_other")):
            table.pop(key, None)
        delattr(dist.Backend, "TPSP_TEST_OTHER")


def test_runs_nested_in_a_rank_have_their_own_worlds():
    """A run started inside a rank (its ranks are new threads) gets its own groups; the outer rank's survive."""
    def inner(comm):
        x = torch.ones(1)
        dist.all_reduce(x)
        return x.item(), dist.get_world_size()

    def outer(comm):
        got = run(inner, 3).outputs if dist.get_rank() == 0 else None
        x = torch.ones(1)
        dist.all_reduce(x)
        return got, x.item(), dist.get_world_size()

    res = run(outer, 2)
    assert res.outputs[0] == ([(3.0, 3)] * 3, 2.0, 2) and res.outputs[1] == (None, 2.0, 2)
    assert {e.group for e in res.trace.events} == {(0, 1)}  # the inner run's calls are in its own trace


def test_store_based_barriers_meet_in_the_runs_shared_store(monkeypatch):
    """TORCH_DIST_INIT_BARRIER=1 makes init_process_group and new_group wait in the store for every rank."""
    monkeypatch.setenv("TORCH_DIST_INIT_BARRIER", "1")

    def fn(comm):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        x = torch.ones(1)
        dist.all_reduce(x, group=mesh.get_group("tp"))
        return x.item()

    assert run(fn, 4, timeout=60).outputs == [2.0] * 4


def test_a_call_on_a_group_the_rank_is_not_in_is_torchs_warned_no_op():
    """As on real backends, c10d itself skips it with a warning before any backend sees it: nothing recorded."""
    def fn(comm):
        group = dist.new_group([0, 1])
        x = torch.ones(1)
        dist.all_reduce(x, group=group)
        return x.item()

    with pytest.warns(UserWarning, match="global rank 2 which does not belong to the given group"):
        res = run(fn, 3)
    assert res.outputs == [2.0, 2.0, 1.0]
    assert [e.rank for e in res.trace.events] == [0, 1]


def test_async_collectives_run_in_the_background_until_their_wait():
    """async_op=True and the functional collectives return a pending Work: recorded non-blocking, the output
    filled (and the WaitMark recorded) at wait() (more in tests/test_async_collectives.py)."""
    def fn(comm):
        x = torch.ones(3, dtype=torch.float64) * (dist.get_rank() + 1)
        work = dist.all_reduce(x, async_op=True)
        before = (work.is_completed(), x.clone())
        work.wait()
        y = funcol.all_gather_tensor(x, 0, dist.group.WORLD)
        return before, work.is_completed(), x, y.wait() if isinstance(y, funcol.AsyncCollectiveTensor) else y

    res = run(fn, 2)
    for r, (before, completed, x, y) in enumerate(res.outputs):
        assert before[0] is False and torch.equal(before[1], torch.full((3,), r + 1.0, dtype=torch.float64))
        assert completed and torch.equal(x, torch.full((3,), 3.0, dtype=torch.float64))
        assert torch.equal(y, torch.full((6,), 3.0, dtype=torch.float64))
    assert [(e.op, e.blocking) for e in res.trace.events if e.rank == 0] == [("all_reduce", False), ("all_gather", False)]
    assert [(w.seq, w.event_seq) for w in res.trace.waits if w.rank == 0] == [(1, 0), (3, 2)]


@pytest.mark.parametrize("p", [1, 3])
def test_a_rank_that_makes_its_own_default_group_fails_the_run_and_leaves_none(p):
    """Without the flag, a rank's own dist.init_process_group made a process-wide group that outlived the run
    (3 ranks: the second to call it finds the first's and raises, or they race and all succeed)."""
    def fn(comm):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    with pytest.raises(ts.SimulationError) as info:
        ts.run(fn, world_size=p)
    said = [str(info.value), *getattr(info.value, "__notes__", [])]
    assert [s for s in said if s.startswith("fn called dist.init_process_group on a virtual rank")]
    assert not dist.is_initialized()
