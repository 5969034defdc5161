"""One transformer block, "tp_sp" forward + backward: the simulator against the dense block, and against
PyTorch's own single-process SPMD simulation (LocalTensorMode running a DTensor SequenceParallel /
ColwiseParallel / RowwiseParallel plan on the same block).

    python benchmarks/block.py                                       # b=4, s=512, h=512, 8 heads; 4 and 8 ranks
    python benchmarks/block.py --seq 128 --hidden 128 --ranks 4      # smaller

All three run the same weights in float32, causal, dropout off (the DTensor plan has no per-shard
dropout), in one process, each checked against the dense output and input gradient. Each time is
the fastest of --repeats forward + backward passes after a warm-up pass (the least disturbed by
other work on the machine); dense and simulator passes alternate, so they share the same load.
Wall time depends on that load; CPU time (all threads of the process) is the work done, and holds
still on a busy machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.distributed as dist

import tpsp_sim as ts


def clock() -> tuple[float, float]:
    """(wall, CPU) seconds; CPU time is summed over every thread of the process, so it counts the
    work done whatever else the machine runs."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    return tuple(now - then for now, then in zip(clock(), start))


def fwd_bwd(block, x, gy):
    """(wall, CPU) seconds of one forward + backward, the output and the input gradient."""
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    start = clock()
    y = block(x)
    y.backward(gy)
    return since(start), y.detach(), x.grad


def time_simulator_and_dense(block, x, gy, t, repeats):
    """Paired rounds, so both see the same load: rank 0 times a dense pass while the other ranks wait
    (blocked, not spinning) at a barrier, then every rank times its simulated pass between barriers."""
    def fn(comm):
        p = ts.ParallelTransformerBlock.from_dense(block, comm, "tp_sp")
        xs, gs = (ts.shard_sequence(z, comm.rank, t, dim=1) for z in (x, gy))
        dense, sim = [], []
        for i in range(repeats + 1):  # the first round warms up
            comm.barrier()
            if comm.rank == 0:
                dense.append(fwd_bwd(block, x, gy)[0])
            comm.barrier()
            start = clock()
            _, y, dx = fwd_bwd(p, xs, gs)
            comm.barrier()
            sim.append(since(start))
        return dense[1:], sim[1:], y, dx

    outs = ts.run(fn, world_size=t).outputs
    return outs[0][0], outs[0][1], torch.cat([o[2] for o in outs], 1), torch.cat([o[3] for o in outs], 1)


def time_local_tensor_mode(block, x, gy, t, repeats):
    """The same block under LocalTensorMode with DTensor's sequence-parallel plan (a fake process group)."""
    from torch.distributed._local_tensor import LocalTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    block = copy.deepcopy(block)
    with torch.no_grad():  # ColwiseParallel cuts contiguously: order the rows [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]
        for w in (block.attn.qkv.weight, block.attn.qkv.bias):
            w.copy_(w.unflatten(0, (3, t, -1)).transpose(0, 1).flatten(0, 2))
    plan = {"ln1": SequenceParallel(), "attn.qkv": ColwiseParallel(input_layouts=Shard(1)),
            "attn.proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            "ln2": SequenceParallel(), "mlp.fc1": ColwiseParallel(input_layouts=Shard(1)),
            "mlp.fc2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)}
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=t)
    try:
        with LocalTensorMode(t):
            mesh = init_device_mesh("cpu", (t,))
            parallelize_module(block, mesh, plan)
            xs, gs = (distribute_tensor(z, mesh, [Shard(1)]) for z in (x, gy))
            times = [fwd_bwd(block, xs, gs) for i in range(repeats + 1)]
            y, dx = (_rank0(z.full_tensor()) for z in times[-1][1:])
    finally:
        dist.destroy_process_group()
    return fastest([t for t, _, _ in times[1:]]), y, dx


def fastest(times: list[tuple[float, float]]) -> tuple[float, float]:
    """The least disturbed pass: the smallest wall time, and the smallest CPU time."""
    return min(w for w, _ in times), min(c for _, c in times)


def _rank0(z):
    """Rank 0's copy of a LocalTensor (every rank holds the same full tensor)."""
    return z._local_tensors[0] if hasattr(z, "_local_tensors") else z


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
    block = ts.TransformerBlock(a.hidden, a.heads, causal=True)
    x, gy = torch.randn(a.batch, a.seq, a.hidden), torch.randn(a.batch, a.seq, a.hidden)
    print(f"block b={a.batch} s={a.seq} h={a.hidden} heads={a.heads}, float32, forward + backward; "
          f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs\n")
    print("| t | dense ms | simulator ms | LocalTensorMode ms | simulator / dense: wall, CPU "
          "| LocalTensorMode / simulator: wall, CPU | max error: sim, LTM |")
    print("|---|---|---|---|---|---|---|")
    _, y, dx = fwd_bwd(block, x, gy)
    for t in a.ranks:
        dense_times, sim_times, sy, sdx = time_simulator_and_dense(block, x, gy, t, a.repeats)
        dense, sim = fastest(dense_times), fastest(sim_times)
        sim_err = max((sy - y).abs().max().item(), (sdx - dx).abs().max().item())
        try:
            ltm, ly, ldx = time_local_tensor_mode(block, x, gy, t, a.repeats)
            ltm_err = max((ly - y).abs().max().item(), (ldx - dx).abs().max().item())
            ltm_cells = (f"{ltm[0] * 1e3:.0f} | {sim[0] / dense[0]:.2f}, {sim[1] / dense[1]:.2f} | "
                         f"{ltm[0] / sim[0]:.1f}, {ltm[1] / sim[1]:.1f} | {sim_err:.0e}, {ltm_err:.0e}")
        except Exception as error:  # noqa: BLE001 - report why PyTorch's simulation could not run the plan
            ltm_cells = (f"failed: {type(error).__name__}: {error} | {sim[0] / dense[0]:.2f}, {sim[1] / dense[1]:.2f} "
                         f"| - | {sim_err:.0e}, -")
        print(f"| {t} | {dense[0] * 1e3:.0f} | {sim[0] * 1e3:.0f} | {ltm_cells} |")
    print("\nsimulator / dense: the price of simulating t ranks (the same FLOPs, plus copies and rendezvous);"
          "\nLocalTensorMode / simulator: how much faster the simulator runs the same step."
          "\nwall: the fastest pass's wall time; CPU: the smallest CPU time of a pass, all threads together.")

if __name__ == "__main__":
    main()
