"""What one simulated collective costs: fixed cost per call (µs) as a ratio to one round of a bare
``threading.Barrier`` among the same number of threads (the floor for anything that makes p threads
meet), measured in the same run; and cost per MB next to a plain in-process copy of the same data.

    python benchmarks/collectives.py [--world-sizes 2 4 8] [--calls 200] [--mb 1 16] [--switch-interval S]

The fixed cost is measured with a tiny tensor (p floats per rank): (time of a run making K calls - time of a run
making none) / K, so thread start-up is not counted; the barrier the same way, with p threads making K
rounds. Each number is the best of --repeats runs, and the barrier is timed right before each op's row.
``--switch-interval`` sets ``sys.setswitchinterval`` for this process only (CPython's default is 0.005 s).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

import torch

import tpsp_sim as ts

from timing import best_of  # benchmarks/timing.py: the fastest of n calls

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "barrier", "sendrecv")


def call(comm, op: str, x: torch.Tensor):
    if op == "sendrecv":
        return comm.sendrecv(x, (comm.rank + 1) % comm.world_size, (comm.rank - 1) % comm.world_size)
    if op == "all_to_all":
        return comm.all_to_all(x, 0, 0)
    if op == "barrier":
        return comm.barrier()
    return getattr(comm, op)(x)


def in_process(op: str, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's result computed in one thread: the data movement alone."""
    if op == "all_reduce":
        total = xs[0].clone()
        for x in xs[1:]:
            total += x
        return [total.clone() for _ in xs]
    if op == "all_gather":
        return [torch.cat(xs) for _ in xs]
    raise ValueError(op)


def repeat_calls(comm, op: str, x: torch.Tensor, calls: int) -> None:
    for _ in range(calls):
        call(comm, op, x)


def barrier_rounds(p: int, rounds: int) -> None:
    """p threads meet ``rounds`` times at one threading.Barrier."""
    barrier = threading.Barrier(p)

    def body():
        for _ in range(rounds):
            barrier.wait()

    threads = [threading.Thread(target=body) for _ in range(p)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def per_call(run, calls: int, repeats: int) -> float:
    """µs per call: (best time of a run making ``calls`` calls - best time of one making none) / calls."""
    return (best_of(repeats, lambda: run(calls), warm_up=False)[0] - best_of(repeats, lambda: run(0), warm_up=False)[0]) / calls * 1e6


def sim_per_call(op: str, p: int, numel: int, calls: int, repeats: int) -> float:
    x = torch.ones(numel)
    return per_call(lambda k: ts.run(repeat_calls, op, x, k, world_size=p), calls, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--mb", type=float, nargs="+", default=[1.0, 16.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--switch-interval", type=float, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)

    print(f"load average {os.getloadavg()[0]:.2f}, switch interval {sys.getswitchinterval()} s; fixed cost per call "
          f"(p floats per rank, {args.calls} calls, best of {args.repeats})")
    print(f"{'op':<15}{'p':>3}{'sim µs':>10}{'barrier µs':>12}{'sim / barrier':>15}")
    for p in args.world_sizes:
        for op in OPS:
            barrier = per_call(lambda k: barrier_rounds(p, k), args.calls, args.repeats)
            sim = sim_per_call(op, p, p, args.calls, args.repeats)
            print(f"{op:<15}{p:>3}{sim:>10.1f}{barrier:>12.1f}{sim / barrier:>15.2f}")

    print("\ncost per MB of each rank's input (all_reduce, all_gather), best of", args.repeats)
    print(f"{'op':<15}{'p':>3}{'MB':>6}{'sim µs/MB':>12}{'copy µs/MB':>12}{'ratio':>8}")
    for p in args.world_sizes:
        for mb in args.mb:
            numel = int(mb * 2**20 / 4) // p * p
            xs = [torch.ones(numel) for _ in range(p)]
            for op in ("all_reduce", "all_gather"):
                sim = sim_per_call(op, p, numel, 5, args.repeats)
                copy = best_of(args.repeats, lambda: [in_process(op, xs) for _ in range(5)], warm_up=False)[0] / 5 * 1e6
                print(f"{op:<15}{p:>3}{mb:>6.0f}{sim / mb:>12.0f}{copy / mb:>12.0f}{sim / copy:>8.2f}")


if __name__ == "__main__":
    main()
