"""Exercises of notebooks 01 and 02: Megatron's four mappings f, f̄, g, ḡ as autograd Functions.

Each takes ``(x, comm)``; g and ḡ work on the sequence dim (1) of ``[batch, seq, hidden]``. The
checker runs forward and backward on every rank and compares the output and the input's gradient
with the dense answer, then the calls of each phase and the bytes they send (p ranks, N bytes =
the full [2, 12, 4] float64 tensor = 768 B; ring formulas of design section 4):

    f   forward: nothing            backward: 1 all_reduce,     2(p-1)/p·N
    f̄   forward: 1 all_reduce,      2(p-1)/p·N        backward: nothing
    g   forward: 1 all_gather,      (p-1)·N/p         backward: 1 reduce_scatter, (p-1)/p·N
    ḡ   forward: 1 reduce_scatter,  (p-1)/p·N         backward: 1 all_gather,     (p-1)·N/p
"""

from __future__ import annotations

from typing import Callable

import torch

from . import solutions
from .harness import WORLD_SIZES, Exercise, check_bytes, check_calls, compare, first, randn, run_ranks

SHAPE = (2, 12, 4)  # [batch, seq, hidden]; seq divides into 2, 3 or 4 shards
N = 2 * 12 * 4 * 8  # bytes of one full float64 tensor


def _mapping_case(fn: Callable, p: int, inputs: list[torch.Tensor], upstream: list[torch.Tensor],
                  outputs: list[torch.Tensor], grads: list[torch.Tensor], calls: dict[str, tuple]) -> list[str]:
    """Run ``fn(x, comm)`` forward, then backward from ``upstream[rank]``; compare with the dense answers
    and each phase's calls with ``calls[phase] = (op, bytes sent, formula)`` (op None: no calls)."""
    def rank_fn(comm):
        x = inputs[comm.rank].clone().requires_grad_()
        y = fn(x, comm)
        ran = isinstance(y, torch.Tensor) and y.shape == upstream[comm.rank].shape and y.requires_grad
        if ran:
            y.backward(upstream[comm.rank])
        return y, x.grad, ran

    res = run_ranks(rank_fn, p)
    problems = first(compare(f"rank {r}'s output", y, want) for r, ((y, _, _), want) in enumerate(zip(res.outputs,
                                                                                                       outputs)))
    backward_ran = all(ran for _, _, ran in res.outputs)
    if not problems:
        problems = first([f"rank {r}'s input has no gradient: the output is not connected to it (comm's "
                          f"collectives do not track autograd: wrap them in an autograd Function)"] if dx is None
                         else compare(f"rank {r}'s input gradient", dx, want)
                         for r, ((_, dx, _), want) in enumerate(zip(res.outputs, grads)))
    for phase, (op, sent, formula) in calls.items():
        if phase == "backward" and not backward_ran:  # nothing to judge: say so instead of "called nothing"
            problems.append("backward: not checked — it runs once the output has the expected shape and "
                            "requires grad")
            continue
        found = check_calls(res.trace, p, phase, expected={op: 1} if op else {})
        problems += found or (check_bytes(res.trace, p, phase, sent, formula) if op else [])
    return problems


def _draws(p: int, shape: tuple[int, ...], salt: int) -> list[torch.Tensor]:
    return [randn(*shape, seed=100 * salt + 10 * p + r) for r in range(p)]


def _shard(x: torch.Tensor, p: int) -> list[torch.Tensor]:
    return list(x.chunk(p, 1))


def _all_reduce(p: int) -> tuple[int, str]:
    return 2 * (p - 1) * N // p, f"2(p-1)/p·N = 2·{p - 1}/{p}·{N}"


def _scatter_or_gather(p: int) -> tuple[int, str]:
    return (p - 1) * N // p, f"(p-1)/p·N = {p - 1}/{p}·{N}"


def _f_case(fn: Callable, p: int) -> list[str]:
    x, upstream = randn(*SHAPE, seed=p), _draws(p, SHAPE, 1)  # replicated input, a partial gradient per rank
    return _mapping_case(fn, p, [x] * p, upstream, [x] * p, [sum(upstream)] * p,
                         {"forward": (None, 0, ""), "backward": ("all_reduce", *_all_reduce(p))})


def _f_bar_case(fn: Callable, p: int) -> list[str]:
    partials, upstream = _draws(p, SHAPE, 2), randn(*SHAPE, seed=p)  # replicated gradient after the sum
    return _mapping_case(fn, p, partials, [upstream] * p, [sum(partials)] * p, [upstream] * p,
                         {"forward": ("all_reduce", *_all_reduce(p)), "backward": (None, 0, "")})


def _g_case(fn: Callable, p: int) -> list[str]:
    full, upstream = randn(*SHAPE, seed=p), _draws(p, SHAPE, 3)  # each rank's partial gradient of the full sequence
    return _mapping_case(fn, p, _shard(full, p), upstream, [full] * p, _shard(sum(upstream), p),
                         {"forward": ("all_gather", *_scatter_or_gather(p)),
                          "backward": ("reduce_scatter", *_scatter_or_gather(p))})


def _g_bar_case(fn: Callable, p: int) -> list[str]:
    partials, upstream = _draws(p, SHAPE, 4), _shard(randn(*SHAPE, seed=p), p)
    return _mapping_case(fn, p, partials, upstream, _shard(sum(partials), p), [torch.cat(upstream, 1)] * p,
                         {"forward": ("reduce_scatter", *_scatter_or_gather(p)),
                          "backward": ("all_gather", *_scatter_or_gather(p))})


def _exercise(name: str, notebook: str, task: str, case: Callable, forward: str, backward: str, cls) -> Exercise:
    fn = getattr(solutions, name)
    return Exercise(name=name, notebook=notebook, task=task, cases=WORLD_SIZES, case_label="ranks", check_case=case,
                    checked=f"output and input gradient equal the dense answer on 2, 3 and 4 ranks; forward calls "
                            f"{forward}, backward {backward}, with the ring formulas' bytes.",
                    solution=fn, solution_source=(cls, fn))


F = _exercise("f", "01_tensor_parallel", "f(x, comm): enter a TP region — forward identity, backward all-reduce",
              _f_case, "nothing", "one all_reduce", solutions.CopyToRegion)
F_BAR = _exercise("f_bar", "01_tensor_parallel",
                  "f_bar(x, comm): leave a TP region — forward all-reduce, backward identity",
                  _f_bar_case, "one all_reduce", "nothing", solutions.ReduceFromRegion)
G = _exercise("g", "02_sequence_parallel",
              "g(x, comm): sequence shards → full sequence — forward all-gather (dim 1), backward reduce-scatter",
              _g_case, "one all_gather", "one reduce_scatter", solutions.GatherFromSequenceRegion)
G_BAR = _exercise("g_bar", "02_sequence_parallel",
                  "g_bar(x, comm): partial sums → summed sequence shard — forward reduce-scatter (dim 1), "
                  "backward all-gather", _g_bar_case, "one reduce_scatter", "one all_gather",
                  solutions.ReduceScatterToSequenceRegion)
