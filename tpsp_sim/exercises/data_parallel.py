"""Puzzles of notebook 10 (data parallelism and ZeRO): a memory target and a bytes budget to meet.

    from tpsp_sim.exercises.data_parallel import check, show_solution
    check("fit_in_memory", shard)            # ✓, or what is wrong: weights vs dense, bytes held, bytes sent
    check("accumulate_gradients", train_step)

Each runs the learner's code on 4 virtual ranks for two AdamW steps of a tiny Llama in float64 and
compares the weights with the dense model's. Closed forms (ZeRO paper; data_parallel/closed_forms.py):
plain data parallelism holds 8 + 8 + 16 = 32 bytes per parameter (float64 weights, gradients, AdamW's
two moments) and sends 2Ψ(p−1)/p per step. These are kept apart from ``tpsp_sim.exercises.EXERCISES``
(the exercises of notebooks 00–03) and checked the same way: a stub that still raises
``NotImplementedError`` is reported with the reference solution checked instead.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

from ..data_parallel.closed_forms import zero_bytes_per_step, zero_memory_per_rank
from ..data_parallel.ddp import DistributedDataParallel
from ..data_parallel.fsdp import FSDPModule, fully_shard
from ..data_parallel.memory import held_bytes
from ..models.tiny_llama import TinyLlama
from .harness import Exercise, compare, first, run_ranks
from .targets import puzzle_set

RANKS = 4
STEPS, MICRO, BATCH, SEQ, LR = 2, 3, 8, 8, 1e-2
MEMORY_TARGET = 0.4  # of plain data parallelism's weights + gradients + optimizer state


def _model() -> TinyLlama:
    torch.manual_seed(0)
    return TinyLlama(64, 32, 2, 4, 2, 64).double()


def _data() -> torch.Tensor:
    return torch.randint(0, 64, (STEPS, MICRO, BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))


def mean_loss(net, rows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``rows`` [batch, seq + 1]: the ``loss_fn`` the puzzles pass."""
    return F.cross_entropy(net(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())


def _dense(model, data, micro: int) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for step in data:
        opt.zero_grad()
        for rows in step[:micro]:
            (mean_loss(model, rows) / micro).backward()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def _whole(net) -> dict[str, torch.Tensor]:
    for m in net.modules():
        if isinstance(m, FSDPModule):
            m.unshard()
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def _compare_weights(outputs, want) -> list[str]:
    def one(r, got):
        if got.keys() != want.keys():
            return [f"rank {r}'s parameters are {sorted(got)[:3]}..., expected the dense names {sorted(want)[:3]}..."]
        return first(compare(f"rank {r}'s {n} after {STEPS} steps", got[n], w, atol=1e-10) for n, w in want.items())
    return first(one(r, out[0]) for r, out in enumerate(outputs))


# ---- puzzle 1: fit the memory ------------------------------------------------------------------------

def _fit_case(shard: Callable, p: int) -> list[str]:
    model, data = _model(), _data()

    def rank_fn(comm):
        net = copy.deepcopy(model)
        call, opt = shard(comm, net)
        for step in data:
            opt.zero_grad()
            mean_loss(call, step[0].chunk(comm.world_size)[comm.rank]).backward()
            opt.step()
        held = held_bytes(net, opt)  # before _whole, which all-gathers every sharded module
        return _whole(net), held

    res = run_ranks(rank_fn, p)
    problems = _compare_weights(res.outputs, _dense(model, data, 1))
    n = sum(q.numel() for q in model.parameters())
    plain = sum(zero_memory_per_rank(n, p, 0, weight_bytes=8, grad_bytes=8, optimizer_bytes=16).values())
    target = MEMORY_TARGET * plain
    for r, (_, held) in enumerate(res.outputs):
        if sum(held.values()) > target:
            problems.append(f"rank {r} holds {sum(held.values()):,} B (weights {held['weights']:,}, gradients "
                            f"{held['gradients']:,}, optimizer {held['optimizer']:,}); the target is "
                            f"{MEMORY_TARGET:.0%} of plain data parallelism's {plain:,} B = {target:,.0f} B")
            break
    return problems


def fit_in_memory(comm, net):
    """Reference: ZeRO-3 — every block sharded, then the root (FSDP2's order)."""
    for block in net.blocks:
        fully_shard(block, comm)
    fully_shard(net, comm)
    return net, torch.optim.AdamW(net.parameters(), lr=LR)


FIT_IN_MEMORY = Exercise(
    name="fit_in_memory", notebook="10_data_parallelism_and_zero",
    task="shard(comm, net) -> (module to call, optimizer): at most 40% of plain DDP's bytes per rank, exact",
    cases=(RANKS,), case_label="ranks", check_case=_fit_case,
    checked=f"two AdamW steps on {RANKS} ranks equal the dense model's (1e-10) and every rank holds at most "
            f"{MEMORY_TARGET:.0%} of plain data parallelism's weights + gradients + optimizer state.",
    solution=fit_in_memory, solution_source=(fit_in_memory,))


# ---- puzzle 2: one reduction per step ------------------------------------------------------------------

def _accumulate_case(train_step: Callable, p: int) -> list[str]:
    model, data = _model(), _data()

    def rank_fn(comm):
        ddp = DistributedDataParallel(copy.deepcopy(model), comm)
        opt = torch.optim.AdamW(ddp.parameters(), lr=LR)
        for step in data:
            train_step(ddp, opt, [rows.chunk(comm.world_size)[comm.rank] for rows in step], mean_loss)
        return _whole(ddp.module), None

    res = run_ranks(rank_fn, p)
    problems = _compare_weights(res.outputs, _dense(model, data, MICRO))
    psi = sum(q.numel() for q in model.parameters()) * 8
    budget = int(zero_bytes_per_step(psi, p, 0))
    for r in range(p):
        sent = res.trace.total(rank=r, phase="grad_sync") / STEPS
        if sent > budget:
            problems.append(f"rank {r} sent {sent:,.0f} B of gradient reductions per step, {sent / budget:.1f} × one "
                            f"all-reduce of the gradients (2Ψ(p−1)/p = {budget:,} B): reduce once per step")
            break
    return problems


def accumulate_gradients(ddp, opt, micro_batches, loss_fn):
    """Reference: every micro-batch but the last under no_sync; the last one's backward reduces the sum."""
    opt.zero_grad()
    for rows in micro_batches[:-1]:
        with ddp.no_sync():
            (loss_fn(ddp, rows) / len(micro_batches)).backward()
    (loss_fn(ddp, micro_batches[-1]) / len(micro_batches)).backward()
    opt.step()


ACCUMULATE_GRADIENTS = Exercise(
    name="accumulate_gradients", notebook="10_data_parallelism_and_zero",
    task="train_step(ddp, opt, micro_batches, loss_fn): one optimizer step over all micro-batches, one reduction",
    cases=(RANKS,), case_label="ranks", check_case=_accumulate_case,
    checked=f"two steps of {MICRO} accumulated micro-batches on {RANKS} ranks equal the dense model's (1e-10), "
            f"sending one all-reduce of the gradients (2Ψ(p−1)/p) per step.",
    solution=accumulate_gradients, solution_source=(accumulate_gradients,))

PUZZLES, check, show_solution = puzzle_set(FIT_IN_MEMORY, ACCUMULATE_GRADIENTS)
