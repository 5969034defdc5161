"""The same torch.distributed / DTensor / FSDP2 script on virtual ranks and on gloo processes
(``ts.run(..., torch_distributed=True)``, and under torchrun): same outputs, same trace event by event."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import parallelize_module

import tpsp_sim as ts
from tpsp_sim.torch_api.plans import llama_tp_sp_plan

pytestmark = [pytest.mark.real, pytest.mark.timeout(180), pytest.mark.filterwarnings("ignore::FutureWarning")]


def every_call(comm):
    """Collectives (AVG too: gloo has none, the Comm sums and divides), a ring, a 2-D mesh; integer-valued data."""
    r, p = dist.get_rank(), dist.get_world_size()
    x = torch.arange(8.0) + r
    with comm.scope("collectives"):
        dist.all_reduce(x)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        dist.all_reduce(avg := x.clone(), op=dist.ReduceOp.AVG)
        gathered = torch.empty(8 * p)
        dist.all_gather_into_tensor(gathered, x)
        scattered = torch.empty(8 // p)
        dist.reduce_scatter_tensor(scattered, x)
        dist.broadcast(x, src=p - 1)
        exchanged = torch.empty(8)
        dist.all_to_all_single(exchanged, x + r)
    with comm.scope("ring"):
        got = torch.empty(8)
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, x * r, (r + 1) % p),
                                            dist.P2POp(dist.irecv, got, (r - 1) % p)]):
            work.wait()
    mesh = init_device_mesh("cpu", (2, p // 2), mesh_dim_names=("dp", "tp"))
    with comm.scope("mesh"):
        dist.all_reduce(x, group=mesh.get_group("tp"))
        dist.all_reduce(x, group=mesh.get_group("dp"))
    dist.barrier()
    return x, avg, gathered, scattered, exchanged, got


def same_run(sim, real):
    assert all(torch.equal(a, b) for o, q in zip(sim.outputs, real.outputs) for a, b in zip(o, q))
    assert real.trace.events == sim.trace.events
    assert real.trace.waits == sim.trace.waits


def test_a_dist_script_on_gloo_gives_the_simulators_outputs_and_trace():
    sim = ts.run(every_call, world_size=4, torch_distributed=True)
    real = ts.run(every_call, world_size=4, backend="gloo", torch_distributed=True)
    same_run(sim, real)
    assert {e.axis for e in real.trace.events if e.scope == "mesh"} == {"dp", "tp"}


def tp_and_fsdp(comm, dense, x):
    """torchtitan's composition on a (dp, tp) mesh: DTensor TP+SP inside, FSDP2 over dp."""
    t = dist.get_world_size() // 2
    mesh = init_device_mesh("cpu", (2, t), mesh_dim_names=("dp", "tp"))
    block = parallelize_module(copy.deepcopy(dense), mesh["tp"], llama_tp_sp_plan())
    fully_shard(block, mesh=mesh["dp"])
    xi = x.chunk(2, 0)[mesh.get_local_rank("dp")].chunk(t, 1)[mesh.get_local_rank("tp")].clone().requires_grad_()
    with comm.scope("block"):
        y = block(xi)
        y.square().sum().backward()
    return y.detach(), xi.grad


def test_dtensor_tp_with_fsdp2_on_gloo_gives_the_simulators_outputs_and_trace():
    torch.manual_seed(0)
    dense, x = ts.LlamaBlock(16, 4, 2, d_ff=24), torch.randn(2, 8, 16)
    sim = ts.run(tp_and_fsdp, dense, x, world_size=4, torch_distributed=True)
    real = ts.run(tp_and_fsdp, dense, x, world_size=4, backend="gloo", torch_distributed=True)
    same_run(sim, real)
    assert {(e.op, e.axis) for e in real.trace.events if e.scope == "block"} >= {("all_gather", "tp"),
                                                                                ("reduce_scatter", "dp")}


@pytest.mark.slow
def test_torchrun_runs_the_same_dist_script_recorded(tmp_path):
    (tmp_path / "dist_job.py").write_text(textwrap.dedent("""
        import torch
        import torch.distributed as dist
        from tpsp_sim.torch_api.backend import on_default_group

        def script(comm):
            x = torch.full((3,), float(dist.get_rank() + 1))
            with comm.scope("sum"):
                dist.all_reduce(x)
            return x

        recorded = on_default_group(script)  # the worker calls recorded(comm): dist.* goes through the comm
    """))
    out = tmp_path / "result.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tpsp_sim.dist.worker", "dist_job:recorded", "--out", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-2000:]
    result = torch.load(out, weights_only=False)
    assert [o.tolist() for o in result["outputs"]] == [[3.0] * 3] * 2
    sys.path.insert(0, str(tmp_path))
    try:
        from dist_job import script
        sim = ts.run(script, world_size=2, torch_distributed=True)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("dist_job", None)
    assert result["trace"].events == sim.trace.events


def comm_api_and_dist(comm):
    """The package's own comm API beside dist.* in one fn: broadcast names a group rank, new_group splits."""
    x = comm.broadcast(torch.full((2,), float(comm.rank)), comm.world_size - 1)
    dist.all_reduce(y := torch.ones(2))
    pair = comm.new_group([0, 1])
    z = pair.all_gather(torch.ones(1) * comm.rank) if pair is not None else torch.empty(0)
    w = comm.sendrecv(torch.ones(1) * comm.rank, (comm.rank + 1) % comm.world_size, (comm.rank - 1) % comm.world_size)
    return x, y, z, w


def test_the_comm_api_beside_dist_calls_on_gloo_gives_the_simulators_outputs_and_trace():
    """It failed on gloo: the comm's calls ran in the rank's own c10d world, which knows none of the real groups."""
    sim = ts.run(comm_api_and_dist, world_size=3, torch_distributed=True)
    real = ts.run(comm_api_and_dist, world_size=3, backend="gloo", torch_distributed=True)
    same_run(sim, real)


def dist_without_the_flag(comm):
    dist.all_reduce(x := torch.ones(2))
    return x


@pytest.mark.parametrize("backend", ["sim", "gloo"])
def test_without_the_flag_dist_calls_fail_alike_on_both_backends(backend):
    """gloo ran them on the worker's own group, unrecorded, where the simulator has no group: both raise now."""
    with pytest.raises(ValueError, match="^rank [01] raised ValueError: Default process group has not been "
                                         "initialized") as info:
        ts.run(dist_without_the_flag, world_size=2, backend=backend, timeout=60)
    assert info.value.__notes__ == ["tpsp_sim: inside ts.run without torch_distributed=True: pass "
                                    "torch_distributed=True, and every rank gets an initialised torch.distributed "
                                    "default group for its dist.* calls"]
