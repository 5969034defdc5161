"""Many virtual ranks: causal zigzag ring attention and a TP+SP transformer block, wall time per
forward + backward.

    python benchmarks/scaling.py [--ranks 8 16 32 64] [--repeats 3] [--switch-interval S]

Ring attention: b = 1, s = 2048, 4 heads, d = 64, float32, causal, zigzag layout (the workload of
issue 9). Block: ``ts.ParallelTransformerBlock`` in mode ``"tp_sp"`` from a causal
``ts.TransformerBlock`` with b = 1, s = 512, h = 512, 64 heads (so 64 ranks divide the heads), float32.
Each time is the fastest of --repeats whole ``ts.run`` calls (thread start-up included) after a
warm-up call. ``--switch-interval`` sets ``sys.setswitchinterval`` for this process only.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import tpsp_sim as ts

from timing import best_of  # benchmarks/timing.py: the fastest of n calls


def ring_pass(comm, q, k, v, dout):
    shard = lambda x: ts.shard_sequence(x, comm.rank, comm.world_size, dim=2, layout="zigzag")
    q, k, v = (shard(x).requires_grad_() for x in (q, k, v))
    ts.ring_attention(q, k, v, comm, causal=True, layout="zigzag").backward(shard(dout))
    return q.grad


def block_pass(comm, block, x, gy):
    p = ts.ParallelTransformerBlock.from_dense(block, comm, "tp_sp")
    xs = ts.shard_sequence(x, comm.rank, comm.world_size, dim=1).requires_grad_()
    p(xs).backward(ts.shard_sequence(gy, comm.rank, comm.world_size, dim=1))
    return xs.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--switch-interval", type=float, default=None)
    a = parser.parse_args()
    if a.switch_interval is not None:
        sys.setswitchinterval(a.switch_interval)
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 4, 2048, 64, generator=g) for _ in range(4))
    torch.manual_seed(0)
    block = ts.TransformerBlock(512, 64, causal=True)
    x, gy = torch.randn(1, 512, 512, generator=g), torch.randn(1, 512, 512, generator=g)
    print(f"load average {os.getloadavg()[0]:.2f}, switch interval {sys.getswitchinterval()} s, "
          f"{torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs")
    print(f"{'p':>4}{'ring attention s':>18}{'tp_sp block s':>15}")
    for p in a.ranks:
        ring = best_of(a.repeats, lambda: ts.run(ring_pass, q, k, v, dout, world_size=p))[0]
        blk = best_of(a.repeats, lambda: ts.run(block_pass, block, x, gy, world_size=p))[0]
        print(f"{p:>4}{ring:>18.3f}{blk:>15.3f}")


if __name__ == "__main__":
    main()
