"""How a run's cost grows with thousands of virtual ranks: one all_reduce of one float per rank (and, with
``--deadlock``, the time to report a deadlock of every rank), whole ``ts.run`` calls, ranks vs seconds.

    python benchmarks/many_ranks.py [--ranks 1000 2000 4000 8000] [--deadlock] [--profile N]

Linear cost would double the seconds with each doubling of ranks; the last column says by how much the
seconds grew from the row above. ``--profile N`` prints cProfile's top functions for N ranks (all threads'
time lands in the supervisor's wait there, so it shows the main thread only; use it for the caller's side).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import tpsp_sim as ts


def one_all_reduce(comm):
    return comm.all_reduce(torch.ones(1))


def deadlock(comm):
    if comm.rank == 0:
        return None
    return comm.all_reduce(torch.ones(1))  # rank 0 never calls it


def seconds(fn, p: int) -> float:
    start = time.perf_counter()
    try:
        ts.run(fn, world_size=p)
    except ts.DeadlockError:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
    parser.add_argument("--deadlock", action="store_true", help="also time reporting a deadlock of every rank")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    rows = [("all_reduce", one_all_reduce)] + ([("deadlock", deadlock)] if args.deadlock else [])
    for name, fn in rows:
        print(f"{name:>10} {'ranks':>6} {'seconds':>8} {'ms/rank':>8} {'growth':>7}")
        previous = None
        for p in args.ranks:
            s = seconds(fn, p)
            growth = "" if previous is None else f"{s / previous:.1f}x"
            print(f"{'':>10} {p:>6} {s:>8.2f} {1000 * s / p:>8.3f} {growth:>7}", flush=True)
            previous = s


if __name__ == "__main__":
    main()
