"""One hybrid Llama block, forward + backward, on a 64-rank (dp=2, cp=4, tp=8) mesh of the simulator.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hybrid_mesh.py [ring|ulysses|usp]
Prints the wall time of the mesh build and of the block step, and the bytes per rank per mesh axis.
"""

from __future__ import annotations

import sys
import time

import torch

import tpsp_sim as ts

SHAPE, NAMES = (2, 4, 8), ("dp", "cp", "tp")
USP_SHAPE, USP_NAMES = (2, 2, 2, 8), ("dp", "ring", "ulysses", "tp")
B, S, D, HEADS, KV_HEADS = 1, 1024, 256, 32, 32  # Ulysses on cp = 4 needs 4 K/V heads per tp rank


def step(comm, dense, x, attention):
    start = time.perf_counter()
    usp = attention == "usp"
    mesh = ts.init_device_mesh(comm, USP_SHAPE if usp else SHAPE, mesh_dim_names=USP_NAMES if usp else NAMES)
    cp = (mesh["ulysses"], mesh["ring"]) if usp else mesh["cp"]
    built = time.perf_counter()
    par = ts.ParallelTransformerBlock.from_dense(dense, tp=mesh["tp"], cp=cp, mode="tp_sp", attention=attention)
    par(ts.shard_hybrid(x[mesh.get_local_rank("dp")], mesh["tp"], cp, attention)).sum().backward()
    ts.sync_gradients(par, mesh)
    return built - start, time.perf_counter() - built


def main(attention: str = "ring") -> None:
    torch.manual_seed(0)
    dense = ts.LlamaBlock(D, HEADS, KV_HEADS, d_ff=4 * D)
    x = torch.randn(2, B, S, D)
    start = time.perf_counter()
    res = ts.run(step, dense, x, attention, world_size=64)
    total = time.perf_counter() - start
    mesh_s = max(o[0] for o in res.outputs)
    step_s = max(o[1] for o in res.outputs)
    print(f"{attention}: 64 ranks, run {total:.2f} s (mesh {mesh_s:.2f} s, block fwd+bwd+grad sync {step_s:.2f} s)")
    for axis, sent in res.trace.group_by("axis").items():
        print(f"  {axis}: {ts.format_bytes(sent / 64)} sent per rank")


if __name__ == "__main__":
    main(*sys.argv[1:])
