"""A DTensor TP+SP step of a Llama block three ways: PyTorch's own plan on the simulator's torch.distributed
backend (``ts.run(..., torch_distributed=True)``), the same plan under PyTorch's LocalTensorMode, and the
package's own TP+SP block written in the ``comm`` API.

    python benchmarks/torch_api.py                                  # b=4, s=512, h=512, 8 heads; 4 and 8 ranks
    python benchmarks/torch_api.py --seq 128 --hidden 128 --ranks 4

All three run the same float32 weights (``ts.LlamaBlock``: the block ``llama_tp_sp_plan`` is written
for; benchmarks/block.py times the GPT block), forward + backward, each checked against the dense
block. The two simulator versions run in one ``ts.run``, rounds alternating between barriers so they
share the machine's load; each time is the fastest of --repeats passes after a warm-up (timing and
LocalTensorMode helpers: benchmarks/block.py). Also: what ``torch_distributed=True`` adds to a run
that makes no dist.* call (setting up and tearing down a default group per rank).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.distributed as dist

import tpsp_sim as ts
from block import clock, fastest, fwd_bwd, since
from tpsp_sim.torch_api.plans import llama_tp_sp_plan


def time_both_on_the_simulator(block, x, gy, t, repeats):
    """(comm-API times, DTensor times, DTensor output, DTensor input gradient): paired rounds in one run."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    def fn(comm):
        ours = ts.ParallelTransformerBlock.from_dense(block, comm, "tp_sp")
        theirs = parallelize_module(copy.deepcopy(block), init_device_mesh("cpu", (t,)), llama_tp_sp_plan())
        xs, gs = (z.chunk(t, 1)[comm.rank] for z in (x, gy))
        times = {"comm": [], "dtensor": []}
        for _ in range(repeats + 1):  # the first round warms up
            for name, module in (("comm", ours), ("dtensor", theirs)):
                comm.barrier()
                start = clock()
                _, y, dx = fwd_bwd(module, xs, gs)
                comm.barrier()
                times[name].append(since(start))
        return times["comm"][1:], times["dtensor"][1:], y, dx

    outs = ts.run(fn, world_size=t, torch_distributed=True).outputs
    return outs[0][0], outs[0][1], torch.cat([o[2] for o in outs], 1), torch.cat([o[3] for o in outs], 1)


def time_local_tensor_mode(block, x, gy, t, repeats):
    """The same plan under LocalTensorMode (one process, a fake group; torch.testing's FakeStore)."""
    from torch.distributed._local_tensor import LocalTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    block = copy.deepcopy(block)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=t)
    try:
        with LocalTensorMode(t):
            mesh = init_device_mesh("cpu", (t,))
            parallelize_module(block, mesh, llama_tp_sp_plan())
            xs, gs = (distribute_tensor(z, mesh, [Shard(1)]).to_local() for z in (x, gy))
            times = [fwd_bwd(block, xs, gs) for _ in range(repeats + 1)]
            y, dx = (torch.cat([z._local_tensors[r] for r in range(t)], 1) for z in times[-1][1:])
    finally:
        dist.destroy_process_group()
    return fastest([w for w, _, _ in times[1:]])[0], y, dx


def setup_cost(t: int, repeats: int) -> tuple[float, float]:
    """Fastest wall seconds of an empty run of t ranks, without and with torch_distributed=True."""
    def best(flag):
        runs = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            ts.run(lambda comm: None, world_size=t, torch_distributed=flag)
            runs.append(time.perf_counter() - start)
        return min(runs[1:])
    return best(False), best(True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    torch.manual_seed(0)
    block = ts.LlamaBlock(a.hidden, a.heads)
    x, gy = torch.randn(a.batch, a.seq, a.hidden), torch.randn(a.batch, a.seq, a.hidden)
    print(f"load average {os.getloadavg()[0]:.1f}; Llama block b={a.batch} s={a.seq} h={a.hidden} heads={a.heads}, "
          f"float32, forward + backward; torch {torch.__version__}, {os.cpu_count()} CPUs\n")
    print("| t | comm API ms | DTensor on ts.run ms | LocalTensorMode ms | DTensor / comm: wall, CPU "
          "| LocalTensorMode / DTensor on ts.run: wall | max error: comm, DTensor, LTM |")
    print("|---|---|---|---|---|---|---|")
    _, y, dx = fwd_bwd(block, x, gy)
    error = lambda out, grad: max((out - y).abs().max().item(), (grad - dx).abs().max().item())
    for t in a.ranks:
        comm_times, dt_times, dty, dtdx = time_both_on_the_simulator(block, x, gy, t, a.repeats)
        comm, dtensor = fastest(comm_times), fastest(dt_times)
        ltm, ly, ldx = time_local_tensor_mode(block, x, gy, t, a.repeats)
        ours = ts.run(lambda c: fwd_bwd(ts.ParallelTransformerBlock.from_dense(block, c, "tp_sp"),
                                        x.chunk(t, 1)[c.rank], gy.chunk(t, 1)[c.rank])[1:], world_size=t).outputs
        comm_err = error(torch.cat([o[0] for o in ours], 1), torch.cat([o[1] for o in ours], 1))
        print(f"| {t} | {comm[0] * 1e3:.0f} | {dtensor[0] * 1e3:.0f} | {ltm * 1e3:.0f} | "
              f"{dtensor[0] / comm[0]:.2f}, {dtensor[1] / comm[1]:.2f} | {ltm / dtensor[0]:.1f} | "
              f"{comm_err:.0e}, {error(dty, dtdx):.0e}, {error(ly, ldx):.0e} |")
    for t in a.ranks:
        plain, with_dist = setup_cost(t, a.repeats)
        print(f"\nan empty run of {t} ranks: {plain * 1e3:.1f} ms, with torch_distributed=True {with_dist * 1e3:.1f} ms")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
