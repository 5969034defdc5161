"""The puzzle of notebook 08: beat the planner's second-best split — or see why nothing beats its best.

    from tpsp_sim.exercises.split import check, show_solution
    check("beat_the_second_best", propose_split)   # ✓, or how far: GiB over the GPU, or % slower than the target

``propose_split(model, seq, gpus, cluster)`` returns a dict of ``ts.analysis.planner.evaluate``'s split
arguments: ``dp``, ``cp``, ``tp`` (required), and ``pp``, ``virtual_stages``, ``zero``, ``recompute``
(optional, evaluate's defaults otherwise), with pp · dp · cp · tp = gpus. It is priced by ``evaluate``, as
``ts.plan`` prices every split (ring attention over cp, the knobs in ``PINNED`` held fixed on both sides),
and must fit in the GPU's memory and train a step at least as fast as the planner's second-best plan.
The planner searched every split of its space, so the only answers are its best and its second-best
(and any split it does not search that happens to be faster): the checker says which. Going faster still
means changing an assumption the planner makes (``ts.analysis.planner.IGNORES``), not the split. The case:
Llama 3 8B, 32K-token sequences, 16 GPUs of two DGX H100 nodes.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

from ..analysis.planner import Plan, evaluate, plan
from .harness import Exercise
from .targets import puzzle_set

GIB = 2**30
CASE = {"model": "llama3-8b", "seq": 32768, "gpus": 16, "cluster": "dgx-h100"}
ATTENTION = "ring"
PINNED = {"micro_batch": 1, "overlap_tp": False}  # planner knobs held the same for the planner and the answer
REQUIRED, OPTIONAL = ("dp", "cp", "tp"), ("pp", "virtual_stages", "zero", "recompute")


@lru_cache(maxsize=4)
def ranked(model: str, seq: int, gpus: int, cluster: str) -> tuple[Plan, ...]:
    """The plans ``ts.plan`` finds for the case that fit and run, best first (ring attention, ``PINNED``)."""
    plans = plan(model, seq, gpus, cluster, attentions=(ATTENTION,), **PINNED)
    return tuple(p for p in plans if p.runs)


def propose_split(model: str, seq: int, gpus: int, cluster: str) -> dict:
    """Reference: the planner's own best plan, as evaluate's arguments."""
    best = ranked(model, seq, gpus, cluster)[0]
    return {"pp": best.pp, "dp": best.dp, "cp": best.cp, "tp": best.tp, "virtual_stages": best.v,
            "zero": best.zero, "recompute": best.recompute}


def _name(p: Plan) -> str:
    pipeline = f"pp={p.pp} v={p.v} " if p.pp > 1 else ""
    return f"{pipeline}dp={p.dp} cp={p.cp} tp={p.tp} {p.recompute}, ZeRO {p.zero}"


def _split_case(fn: Callable, gpus: int) -> list[str]:
    model, seq, cluster = CASE["model"], CASE["seq"], CASE["cluster"]
    got = fn(model, seq, gpus, cluster)
    if not isinstance(got, dict) or any(k not in got for k in REQUIRED):
        return [f"returned {got!r}, not a dict with at least {', '.join(REQUIRED)}"]
    unknown = sorted(set(got) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        return [f"unknown keys {unknown}: a split is {', '.join(REQUIRED + OPTIONAL)}"]
    sizes = {axis: got.get(axis, 1) for axis in ("pp", "dp", "cp", "tp")}
    if not all(isinstance(n, int) and n >= 1 for n in sizes.values()):
        return [f"pp, dp, cp, tp = {tuple(sizes.values())}: each must be a positive int"]
    product = sizes["pp"] * sizes["dp"] * sizes["cp"] * sizes["tp"]
    if product != gpus:
        return [f"pp · dp · cp · tp = {' · '.join(map(str, sizes.values()))} = {product}, not the {gpus} GPUs"]
    try:
        mine = evaluate(model, seq, cluster, attention=ATTENTION, **got, **PINNED)
    except ValueError as error:
        return [f"the planner cannot price {got}: {error}"]
    if not mine.fits:
        return [f"{_name(mine)} does not fit: {mine.why}"]
    plans = ranked(model, seq, gpus, cluster)
    best, second = plans[0], plans[1]
    if mine.step_time > second.step_time:
        exposed = ", ".join([f"{axis} {t:.1f} s" for axis, t in mine.exposed.items() if t]
                            + ([f"bubble {mine.bubble:.1f} s"] if mine.bubble else []))
        return [f"{_name(mine)} fits ({mine.memory.total / GIB:.1f} GiB), but its step takes {mine.step_time:.1f} s: "
                f"{mine.step_time / second.step_time - 1:.1%} slower than the planner's second best "
                f"({_name(second)}, {second.step_time:.1f} s) and {mine.step_time / best.step_time - 1:.1%} slower "
                f"than its best; exposed communication per step: {exposed or 'none'}"]
    return []


def _checked() -> str:
    return (f"{CASE['model']} at {CASE['seq']:,} tokens on {CASE['gpus']} GPUs ({CASE['cluster']}): the split fits and "
            f"its step is no slower than the planner's second-best plan. Only the planner's best does better within "
            f"its search space; beyond it, change an assumption (ts.analysis.planner.IGNORES), not the split.")


BEAT_THE_SECOND_BEST = Exercise(
    name="beat_the_second_best", notebook="08_planning_a_long_context_run",
    task="propose_split(model, seq, gpus, cluster) -> dict(dp=, cp=, tp=, ...): fits, and is at least as fast as "
         "the planner's second-best plan",
    cases=(CASE["gpus"],), case_label="GPUs", check_case=_split_case, checked=_checked(),
    solution=propose_split, solution_source=(propose_split,))

PUZZLES, check, show_solution = puzzle_set(BEAT_THE_SECOND_BEST)
