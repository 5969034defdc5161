"""Ring attention (contiguous and zigzag) and Ulysses on 4 and 8 virtual ranks vs dense SDPA, as ratios.

    .venv/bin/python benchmarks/attention.py [--seq 1024] [--heads 8] [--head-dim 64] [--causal | --no-causal]

One forward + backward per row, float32. Columns (ratios are to dense SDPA on one device):
  time      wall time of the simulated run / dense. All virtual ranks share this machine's cores, so
            this is the simulator's overhead, not a speed-up; real speed comes from p devices.
  flops     FLOPs of the busiest rank / dense FLOPs (forward + backward; ring recomputes tiles in backward).
  balance   max / min FLOPs across ranks (1.00 = every rank does the same work).
  sent      bytes each rank sends, fwd + bwd, / bytes of the full sequence's K and V.
  error     largest |difference| from dense in the output and dq, dk, dv.
"""

from __future__ import annotations

import argparse
import functools

import torch

import tpsp_sim as ts
from tpsp_sim.core.flops import FlopCounter

from timing import best_of  # benchmarks/timing.py: the fastest of n calls


def fwd_bwd(attn, q, k, v, dout, **kwargs):
    """Output and input gradients of one forward + backward on leaves made from q, k, v."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = attn(q, k, v, **kwargs)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def count_flops(fn, *args, **kwargs):
    """(``fn``'s result, the FLOPs it computed)."""
    with FlopCounter() as counter:
        out = fn(*args, **kwargs)
    return out, counter.counted()


def per_rank(comm, q, k, v, dout, attn, causal, layout):
    shard = lambda x: ts.shard_sequence(x, comm.rank, comm.world_size, dim=2, layout=layout)
    kwargs = {"layout": layout} if attn is ts.ring_attention else {}
    return fwd_bwd(lambda *qkv: attn(*qkv, comm, causal=causal, **kwargs), *(shard(x) for x in (q, k, v, dout)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(a.batch, a.heads, a.seq, a.head_dim, generator=g) for _ in range(4))

    dense_time, dense = best_of(a.repeats, lambda: fwd_bwd(ts.dense_attention, q, k, v, dout, causal=a.causal))
    _, dense_flops = count_flops(fwd_bwd, ts.dense_attention, q, k, v, dout, causal=a.causal)
    kv_bytes = 2 * k.numel() * k.element_size()
    print(f"dense SDPA: b={a.batch} heads={a.heads} s={a.seq} d={a.head_dim} causal={a.causal}: "
          f"{dense_time * 1e3:.1f} ms, {dense_flops / 1e9:.2f} GFLOP (fwd+bwd)")
    header = ("method", "p", "time", "flops", "balance", "sent", "error")
    print("  ".join(f"{h:>10}" for h in header))
    for p in (4, 8):
        for name, attn, layout in (("ring", ts.ring_attention, "contiguous"), ("ring-zigzag", ts.ring_attention, "zigzag"),
                                   ("ulysses", ts.ulysses_attention, "contiguous")):
            run = functools.partial(ts.run, per_rank, q, k, v, dout, attn, a.causal, layout, world_size=p)
            t, res = best_of(a.repeats, run)
            flops = run(count_flops=True).trace
            rank_flops = [sum(c.flops for c in flops.compute if c.rank == r) for r in range(p)]
            got = [ts.unshard_sequence([o[i] for o in res.outputs], dim=2, layout=layout) for i in range(4)]
            error = max((x - y).abs().max().item() for x, y in zip(got, dense))
            row = (name, p, t / dense_time, max(rank_flops) / dense_flops, max(rank_flops) / min(rank_flops),
                   res.trace.total(rank=0) / kv_bytes, error)
            print(f"{row[0]:>10}  {row[1]:>10}" + "".join(f"  {x:>10.3f}" for x in row[2:6]) + f"  {row[6]:>10.1e}")


if __name__ == "__main__":
    main()
