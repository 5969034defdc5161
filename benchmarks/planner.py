"""How long ``ts.plan`` takes, in one run: the whole search cold (every layer simulated), the same case
re-planned with other memory settings (layers from the cache), and the search narrowed to TP inside a
node (``tp_within_node``, ``max_tp``), each as a ratio to the cold search measured beside it.

    python benchmarks/planner.py [--model llama3-8b] [--seq 131072] [--gpus 64] [--cluster dgx-h100]
                                 [--attentions ring ulysses usp] [--workers 2]

Issue 19's targets are Llama 3 8B / 128K / 64 GPUs with every attention kind under 5 s on 2 cores and
Llama 3 70B / 128K / 1,024 GPUs under 20 s; the cold search is not there yet (it simulates each
(cp, tp, attention) layer on cp·tp virtual ranks, and the simulator's time grows faster than its
ranks); the cached re-plan is.
"""

from __future__ import annotations

import argparse
import os
import time

import tpsp_sim as ts
from tpsp_sim.analysis import planner
from tpsp_sim.context_parallel.registry import ATTENTIONS


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--seq", type=int, default=131072)
    parser.add_argument("--gpus", type=int, default=64)
    parser.add_argument("--cluster", default="dgx-h100")
    parser.add_argument("--attentions", nargs="+", default=list(ATTENTIONS))
    parser.add_argument("--workers", type=int, default=2)
    a = parser.parse_args()
    case = dict(model=a.model, seq=a.seq, gpus=a.gpus, cluster=a.cluster, attentions=a.attentions, workers=a.workers)
    print(f"load average {os.getloadavg()[0]:.1f}; {a.model}, {a.seq} tokens, {a.gpus} GPUs of {a.cluster}, "
          f"attentions {' '.join(a.attentions)}, {a.workers} workers")
    planner.clear_cache()
    cold, plans = timed(lambda: ts.plan(**case))
    warm, _ = timed(lambda: ts.plan(**case, zero=0))
    planner.clear_cache()
    narrow, _ = timed(lambda: ts.plan(**case, tp_within_node=True, max_tp=8))
    print(f"cold search            {cold:8.1f} s   1.00   ({sum(p.runs for p in plans)} plans run)")
    print(f"re-plan, other memory  {warm:8.1f} s   {warm / cold:.3f}")
    print(f"tp inside a node, <= 8 {narrow:8.1f} s   {narrow / cold:.3f}")


if __name__ == "__main__":
    main()
