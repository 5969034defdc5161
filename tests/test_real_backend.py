"""The same per-rank code on real torch.distributed (gloo processes on loopback) gives the same
outputs and the same trace as the simulator."""

import subprocess
import sys
import textwrap
import time

import pytest
import torch

import tpsp_sim as ts
from tpsp_sim import mappings as M

pytestmark = [pytest.mark.real, pytest.mark.timeout(180)]


def every_call(comm, seed):
    """Every collective, p2p call, scope and a backward through two mappings; integer data, so exact."""
    p, r = comm.world_size, comm.rank
    g = torch.Generator().manual_seed(seed + r)
    x = torch.randint(-5, 6, (2 * p, 3), generator=g).double()
    right, left = (r + 1) % p, (r - 1) % p
    out = {}
    with comm.scope("collectives"):
        out["all_gather"] = comm.all_gather(x, dim=1)
        out["all_reduce"] = comm.all_reduce(x)
        out["max"] = comm.all_reduce(x, op="max")
        out["avg"] = comm.all_reduce(x, op="avg")  # gloo has no AVG: TorchComm sums, then divides
        out["reduce_scatter_avg"] = comm.reduce_scatter(x, dim=0, op="avg")
        out["reduce_scatter"] = comm.reduce_scatter(x, dim=0)
        out["broadcast"] = comm.broadcast(x, src=p - 1)
        out["all_to_all"] = comm.all_to_all(x, scatter_dim=0, gather_dim=1)
        comm.barrier()
    with comm.scope("p2p"):
        out["sendrecv"] = comm.sendrecv(x, dst=right, src=left)
        handles = [comm.isend(x, right), comm.irecv(x, left)]
        out["irecv"] = handles[1].wait()
        handles[0].wait()
    with comm.scope("block"), comm.scope("mlp"):
        w = x.clone().requires_grad_()
        y = M.g_bar(M.g(w, comm, dim=0) * (r + 1), comm, dim=0)
    (y * y).sum().backward()
    out["grad"] = w.grad
    if p > 1:
        pairs = comm.new_group([0, 1])
        if pairs is not None:
            out["pair"] = pairs.all_reduce(x)
    return out


@pytest.mark.parametrize("p", [2, 4])
def test_gloo_matches_the_simulator_outputs_and_trace(p):
    sim = ts.run(every_call, 7, world_size=p)
    real = ts.run(every_call, 7, world_size=p, backend="gloo")
    for rank in range(p):
        assert sim.outputs[rank].keys() == real.outputs[rank].keys()
        for name in sim.outputs[rank]:
            assert torch.equal(sim.outputs[rank][name], real.outputs[rank][name]), (rank, name)
    assert real.trace.events == sim.trace.events
    assert real.trace.waits == sim.trace.waits
    assert real.trace.ops(phase="backward") == {"all_gather": p, "reduce_scatter": p}


def test_a_function_defined_in_a_cell_or_closure_travels_by_value():
    scale = 3.0

    def local_fn(comm):  # not importable by name, as in a notebook cell
        return comm.all_reduce(torch.full((2,), scale * (comm.rank + 1)))

    res = ts.run(local_fn, world_size=2, backend="gloo")
    assert [o.tolist() for o in res.outputs] == [[9.0, 9.0], [9.0, 9.0]]


def fails_on_rank_1(comm):
    if comm.rank == 1:
        raise ValueError("rank 1 has a bad shape")
    comm.all_reduce(torch.ones(2))  # rank 0 waits here until it is stopped


@pytest.mark.timeout(400)
def test_an_exception_in_a_worker_is_raised_with_its_rank_and_releases_the_others():
    """Rank 0 would sit in gloo's all_reduce for the run's 600 s timeout unless it is released."""
    start = time.monotonic()
    with pytest.raises(ts.RankFailedError, match="rank 1 has a bad shape") as info:
        ts.run(fails_on_rank_1, world_size=2, backend="gloo", timeout=600)
    assert info.value.rank == 1 and isinstance(info.value.__cause__, ValueError)
    assert time.monotonic() - start < 300  # seconds on an idle machine: starting 2 processes dominates


def test_an_unpicklable_function_fails_at_once_with_advice():
    import threading
    lock = threading.Lock()
    with pytest.raises(TypeError, match=r"could not serialize fn=<function [\w.<>]*<lambda> at "):  # the caller's fn
        ts.run(lambda comm: lock, world_size=2, backend="gloo")


def test_torchrun_entry_point(tmp_path):
    (tmp_path / "ring_job.py").write_text(textwrap.dedent("""
        import torch

        def shift(comm):
            x = torch.full((3,), float(comm.rank))
            with comm.scope("ring"):
                return comm.sendrecv(x, (comm.rank + 1) % comm.world_size, (comm.rank - 1) % comm.world_size)
    """))
    out = tmp_path / "result.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tpsp_sim.dist.worker", "ring_job:shift", "--out", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ring" in done.stdout and "send" in done.stdout
    result = torch.load(out, weights_only=False)
    assert [o.tolist() for o in result["outputs"]] == [[1.0] * 3, [0.0] * 3]
    sim = ts.run(lambda comm: comm.sendrecv(torch.zeros(3), (comm.rank + 1) % 2, (comm.rank - 1) % 2), world_size=2)
    assert [(e.op, e.sent_bytes, e.recv_bytes) for e in result["trace"].events] == \
        [(e.op, e.sent_bytes, e.recv_bytes) for e in sim.trace.events]
