"""The puzzle of notebook 07: choose a (dp, cp, tp) mesh for a model, a sequence and a number of GPUs
under a memory cap — the one that fits and trains fastest.

    from tpsp_sim.exercises.mesh import check, show_solution
    check("mesh_under_memory_cap", choose_mesh)   # ✓, or how far: GiB over the cap, or % slower than the best

``choose_mesh(model, seq, gpus, cap)`` returns (dp, cp, tp) with dp · cp · tp = gpus (tp innermost, as
Megatron orders them). It is priced as ``ts.plan`` prices every mesh — memory per GPU by
``ts.memory.budget`` (Megatron's accounting, distributed optimizer over dp · cp), the step time from
one layer simulated on the mesh and laid out on the cluster's links, ring attention over cp,
selective recompute — and must use at most ``cap`` bytes per GPU and be as fast as the fastest mesh
that does (within ``SLACK``). The case: Llama 3 8B, 64K-token sequences, 16 GPUs of two DGX H100
nodes, 60 GiB per GPU.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Callable

from ..analysis.cluster import cluster
from ..analysis.planner import Plan, plan
from .harness import Exercise
from .targets import puzzle_set

GIB = 2**30
CASE = {"model": "llama3-8b", "seq": 65536, "gpus": 16, "cap": 60 * GIB}
CLUSTER, ATTENTION, RECOMPUTE = "dgx-h100", "ring", "selective"
SLACK = 0.01  # the answer's step time may exceed the best by this fraction


@lru_cache(maxsize=4)
def priced(model: str, seq: int, gpus: int, cap: float) -> tuple[Plan, ...]:
    """Every (dp, cp, tp) of ``gpus`` (no pipeline) priced by ``ts.plan`` on GPUs of ``cap`` bytes (ring attention, selective
    recompute; seconds): a mesh over the cap is listed with its memory, not simulated."""
    capped = replace(cluster(CLUSTER), memory_bytes=cap)
    return tuple(plan(model, seq, gpus, capped, pp=1, attentions=(ATTENTION,), recompute=(RECOMPUTE,)))


def choose_mesh(model: str, seq: int, gpus: int, cap: float) -> tuple[int, int, int]:
    """Reference: ask the planner, keep the meshes under the cap, take the fastest."""
    fits = [p for p in priced(model, seq, gpus, cap) if p.runs]
    best = min(fits, key=lambda p: p.step_time)
    return best.dp, best.cp, best.tp


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _mesh_case(fn: Callable, gpus: int) -> list[str]:
    model, seq, cap = CASE["model"], CASE["seq"], CASE["cap"]
    got = fn(model, seq, gpus, cap)
    if not (isinstance(got, tuple) and len(got) == 3 and all(isinstance(n, int) and n >= 1 for n in got)):
        return [f"returned {got!r}, not a (dp, cp, tp) tuple of positive ints"]
    dp, cp, tp = got
    if dp * cp * tp != gpus:
        return [f"dp · cp · tp = {dp} · {cp} · {tp} = {dp * cp * tp}, not the {gpus} GPUs"]
    plans = priced(model, seq, gpus, cap)
    mine = next((p for p in plans if (p.dp, p.cp, p.tp) == got), None)
    if mine is None:
        return [f"(dp, cp, tp) = {got} is not a mesh the planner can run: {model} does not split that way"]
    used = mine.memory
    if used.total > cap:
        return [f"(dp, cp, tp) = {got} needs {_gib(used.total)} per GPU, {_gib(used.total - cap)} over the cap of "
                f"{_gib(cap)} (weights, gradients and optimizer {_gib(used.states)}, activations "
                f"{_gib(used.activations)})"]
    if not mine.runs:
        return [f"(dp, cp, tp) = {got} fits but cannot run: {mine.why}"]
    best = min((p for p in plans if p.runs), key=lambda p: p.step_time)
    if mine.step_time > best.step_time * (1 + SLACK):
        exposed = ", ".join(f"{axis} {t:.1f} s" for axis, t in mine.exposed.items() if t)
        return [f"(dp, cp, tp) = {got} fits ({_gib(used.total)} of {_gib(cap)}), but its step takes "
                f"{mine.step_time:.1f} s, {mine.step_time / best.step_time - 1:.0%} slower than the fastest mesh "
                f"that fits ({best.step_time:.1f} s); exposed communication per step: {exposed or 'none'}"]
    return []


MESH_UNDER_MEMORY_CAP = Exercise(
    name="mesh_under_memory_cap", notebook="07_hybrid_parallelism",
    task="choose_mesh(model, seq, gpus, cap) -> (dp, cp, tp): fits in cap bytes per GPU, and trains fastest",
    cases=(CASE["gpus"],), case_label="GPUs", check_case=_mesh_case,
    checked=f"{CASE['model']} at {CASE['seq']:,} tokens on {CASE['gpus']} GPUs ({CLUSTER}): the mesh uses at most "
            f"{_gib(CASE['cap'])} per GPU and its step is within {SLACK:.0%} of the fastest mesh that fits.",
    solution=choose_mesh, solution_source=(choose_mesh,))

PUZZLES, check, show_solution = puzzle_set(MESH_UNDER_MEMORY_CAP)
