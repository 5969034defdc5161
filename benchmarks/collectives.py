"""What one simulated collective costs: fixed cost per call (µs) and cost per MB, next to a plain
in-process copy of the same data (one thread computing every rank's result with ordinary torch ops).

    python benchmarks/collectives.py [--world-sizes 2 4 8] [--calls 200] [--mb 1 16]

The fixed cost is measured with a tiny tensor (p floats per rank): (time of a run making K calls - time of a run
making none) / K, so thread start-up is not counted. Each number is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import time

import torch

import tpsp_sim as ts

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "sendrecv")


def call(comm, op: str, x: torch.Tensor):
    if op == "sendrecv":
        return comm.sendrecv(x, (comm.rank + 1) % comm.world_size, (comm.rank - 1) % comm.world_size)
    if op == "all_to_all":
        return comm.all_to_all(x, 0, 0)
    return getattr(comm, op)(x)


def in_process(op: str, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's result computed in one thread: the data movement alone."""
    p = len(xs)
    if op == "all_reduce":
        total = xs[0].clone()
        for x in xs[1:]:
            total += x
        return [total.clone() for _ in xs]
    if op == "all_gather":
        return [torch.cat(xs) for _ in xs]
    if op == "reduce_scatter":
        total = xs[0].clone()
        for x in xs[1:]:
            total += x
        return [c.clone() for c in total.chunk(p)]
    if op == "all_to_all":
        pieces = [x.chunk(p) for x in xs]
        return [torch.cat([pc[r] for pc in pieces]) for r in range(p)]
    if op == "broadcast":
        return [xs[0].clone() for _ in xs]
    return [xs[(r - 1) % p].clone() for r in range(p)]  # ring shift


def repeat_calls(comm, op: str, x: torch.Tensor, calls: int) -> None:
    for _ in range(calls):
        call(comm, op, x)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(op: str, p: int, numel: int, calls: int, repeats: int) -> tuple[float, float]:
    """(simulator µs per call, in-process copy µs per call) for one collective on p ranks."""
    x = torch.ones(numel)
    empty = best(lambda: ts.run(repeat_calls, op, x, 0, world_size=p), repeats)
    full = best(lambda: ts.run(repeat_calls, op, x, calls, world_size=p), repeats)
    xs = [torch.ones(numel) for _ in range(p)]
    copy = best(lambda: [in_process(op, xs) for _ in range(calls)], repeats)
    return (full - empty) / calls * 1e6, copy / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--mb", type=float, nargs="+", default=[1.0, 16.0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"fixed cost per call (p floats per rank, {args.calls} calls, best of {args.repeats})")
    print(f"{'op':<15}{'p':>3}{'sim µs':>10}{'copy µs':>10}{'sim - copy':>12}")
    for p in args.world_sizes:
        for op in OPS:
            sim, copy = measure(op, p, p, args.calls, args.repeats)
            print(f"{op:<15}{p:>3}{sim:>10.1f}{copy:>10.1f}{sim - copy:>12.1f}")

    print("\ncost per MB of each rank's input (all_reduce, all_gather), best of", args.repeats)
    print(f"{'op':<15}{'p':>3}{'MB':>6}{'sim µs/MB':>12}{'copy µs/MB':>12}{'ratio':>8}")
    for p in args.world_sizes:
        for mb in args.mb:
            numel = int(mb * 2**20 / 4) // p * p
            for op in ("all_reduce", "all_gather"):
                sim, copy = measure(op, p, numel, 5, args.repeats)
                print(f"{op:<15}{p:>3}{mb:>6.0f}{sim / mb:>12.0f}{copy / mb:>12.0f}{sim / copy:>8.2f}")


if __name__ == "__main__":
    main()
