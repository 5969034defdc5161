"""How long ``ts.plan`` takes, in one run: the whole search cold with every rank of each layer simulated
and replayed and every attention tile computed (as before ``ts.sim.solo`` and ``flops.shapes_only``), the
same search cold as ``ts.plan`` runs it (the few ranks the layer's symmetry needs simulated, repeated tiles
answered from their first run, the few ranks the cluster's nodes tell apart replayed), the same case re-planned with other memory settings (layers from
the cache), and the search narrowed to TP inside a node. Ratios are to the first row, measured beside it.

    python benchmarks/planner.py [--model llama3-8b] [--seq 131072] [--gpus 64] [--cluster dgx-h100]
                                 [--attentions ring ulysses usp allgather] [--workers 1] [--skip-every-rank]

Issue 19's targets are Llama 3 8B / 128K / 64 GPUs with every attention kind under 5 s on 2 cores and
Llama 3 70B / 128K / 1,024 GPUs under 20 s (``--model llama3-70b --gpus 1024 --skip-every-rank``: the
every-rank search would take hours there).
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial

import tpsp_sim as ts
from tpsp_sim.analysis import layer, planner
from tpsp_sim.core import flops
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
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--skip-every-rank", action="store_true", help="do not time the every-rank search")
    a = parser.parse_args()
    case = dict(model=a.model, seq=a.seq, gpus=a.gpus, cluster=a.cluster, attentions=a.attentions, workers=a.workers)
    print(f"load average {os.getloadavg()[0]:.1f}; {a.model}, {a.seq} tokens, {a.gpus} GPUs of {a.cluster}, "
          f"attentions {' '.join(a.attentions)}, {a.workers} workers")
    rows = []
    if not a.skip_every_rank:
        symmetric = layer.symmetric_layer
        layer.symmetric_layer = partial(layer.simulate_layer, every_rank=True)  # every rank, replayed whole
        flops.SHAPES_ONLY = False  # and every tile computed
        planner.clear_cache()
        every, before = timed(lambda: ts.plan(**case))
        layer.symmetric_layer, flops.SHAPES_ONLY = symmetric, True
        rows.append(("cold, every rank", every))
    planner.clear_cache()
    cold, plans = timed(lambda: ts.plan(**case))
    rows.append(("cold, symmetric", cold))
    if not a.skip_every_rank:
        assert plans == before, "one rank and every rank must give the same plans"
    rows.append(("re-plan, other memory", timed(lambda: ts.plan(**case, zero=0))[0]))
    planner.clear_cache()
    rows.append(("tp inside a node, <= 8", timed(lambda: ts.plan(**case, tp_within_node=True, max_tp=8))[0]))
    print(f"{sum(p.runs for p in plans)} plans run, {len(plans)} in all")
    for name, seconds in rows:
        print(f"{name:28s} {seconds:8.1f} s   {seconds / rows[0][1]:.3f}")


if __name__ == "__main__":
    main()
