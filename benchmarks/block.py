"""One transformer block, "tp_sp" forward + backward: the simulator against the dense block, and against
PyTorch's own single-process SPMD simulation (LocalTensorMode running a DTensor SequenceParallel /
ColwiseParallel / RowwiseParallel plan on the same block).

    python benchmarks/block.py                                       # b=4, s=512, h=512, 8 heads; 4 and 8 ranks
    python benchmarks/block.py --seq 128 --hidden 128 --ranks 4      # smaller

All three run the same weights in float32, causal, dropout off (the DTensor plan has no per-shard
dropout), in one process, each checked against the dense output and input gradient; each time is
the median of --repeats forward + backward passes after one warm-up pass.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.distributed as dist

import tpsp_sim as ts


def time_dense(block, x, gy, repeats):
    times = []
    for i in range(repeats + 1):
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        start = time.perf_counter()
        y = block(xi)
        y.backward(gy)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), y.detach(), xi.grad


def time_simulator(block, x, gy, t, repeats):
    """Each rank times its passes between barriers; rank 0's median is the step time."""
    def fn(comm):
        p = ts.ParallelTransformerBlock.from_dense(block, comm, "tp_sp")
        xs, gs = (ts.shard_sequence(z, comm.rank, t, dim=1) for z in (x, gy))
        times = []
        for i in range(repeats + 1):
            p.zero_grad(set_to_none=True)
            xi = xs.clone().requires_grad_()
            comm.barrier()
            start = time.perf_counter()
            y = p(xi)
            y.backward(gs)
            comm.barrier()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:]), y.detach(), xi.grad

    outs = ts.run(fn, world_size=t).outputs
    return outs[0][0], torch.cat([o[1] for o in outs], 1), torch.cat([o[2] for o in outs], 1)


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
            times = []
            for i in range(repeats + 1):
                block.zero_grad(set_to_none=True)
                xi = xs.detach().requires_grad_()
                start = time.perf_counter()
                y = block(xi)
                y.backward(gs)
                times.append(time.perf_counter() - start)
            y, dx = (_rank0(z.full_tensor()) for z in (y.detach(), xi.grad))
    finally:
        dist.destroy_process_group()
    return statistics.median(times[1:]), y, dx


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
    print("| t | dense ms | simulator ms | LocalTensorMode ms | simulator / dense | LocalTensorMode / simulator "
          "| max error sim, LTM |")
    print("|---|---|---|---|---|---|---|")
    for t in a.ranks:  # dense is timed again on every row, next to the runs it is compared with
        dense, y, dx = time_dense(block, x, gy, a.repeats)
        sim, sy, sdx = time_simulator(block, x, gy, t, a.repeats)
        sim_err = max((sy - y).abs().max().item(), (sdx - dx).abs().max().item())
        try:
            ltm, ly, ldx = time_local_tensor_mode(block, x, gy, t, a.repeats)
            ltm_err = max((ly - y).abs().max().item(), (ldx - dx).abs().max().item())
            ltm_cells = f"{ltm * 1e3:.1f} | {sim / dense:.2f} | {ltm / sim:.1f} | {sim_err:.0e}, {ltm_err:.0e}"
        except Exception as error:  # noqa: BLE001 - report why PyTorch's simulation could not run the plan
            ltm_cells = f"failed: {type(error).__name__}: {error} | {sim / dense:.2f} | - | {sim_err:.0e}, -"
        print(f"| {t} | {dense * 1e3:.1f} | {sim * 1e3:.1f} | {ltm_cells} |")
    print("\nsimulator / dense: the price of simulating t ranks (same FLOPs, plus copies and rendezvous);"
          "\nLocalTensorMode / simulator: how much faster the simulator runs the same step.")


if __name__ == "__main__":
    main()
