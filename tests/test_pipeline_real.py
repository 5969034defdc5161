"""A pipeline on real torch.distributed: two gloo processes run a 1F1B step whose gradients and trace
(every send and receive, in order, with scope, phase and bytes) equal the simulator's."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

import tpsp_sim as ts
from tpsp_sim.pipeline import stage_module

pytestmark = [pytest.mark.real, pytest.mark.timeout(180)]


def one_f_one_b_step(comm, model, x, y, m):
    model = copy.deepcopy(model)  # virtual ranks share the argument
    stage = ts.PipelineStage(stage_module(list(model), comm.rank, 2), comm.rank, 2, comm)
    schedule = ts.Schedule1F1B(stage, m, loss_fn=lambda out, t: ((out - t) ** 2).mean())
    losses = []
    schedule.step(*([x] if comm.rank == 0 else []), **({"target": y, "losses": losses} if comm.rank == 1 else {}))
    return {n: q.grad for n, q in model.named_parameters() if q.grad is not None}, losses


def test_1f1b_on_two_gloo_processes_equals_the_simulator_event_for_event():
    torch.manual_seed(0)
    model = nn.Sequential(*[ts.TransformerBlock(8, 2) for _ in range(4)]).double()
    x, y = torch.randn(2, 6, 3, 8, dtype=torch.float64).unbind(0)
    sim = ts.run(one_f_one_b_step, model, x, y, 3, world_size=2)
    real = ts.run(one_f_one_b_step, model, x, y, 3, world_size=2, backend="gloo")
    assert real.trace.events == sim.trace.events
    assert real.trace.waits == sim.trace.waits
    assert real.trace.ops() == {"send": 7, "recv": 7}  # 3 activations, 3 gradients, 1 shape header
    for (g_sim, l_sim), (g_real, l_real) in zip(sim.outputs, real.outputs):
        assert g_sim.keys() == g_real.keys() and len(g_sim) > 0
        for name in g_sim:
            assert torch.equal(g_sim[name], g_real[name]), name
        assert [t.item() for t in l_sim] == [t.item() for t in l_real]


def wrong_order(comm):
    stage = ts.PipelineStage(nn.Linear(2, 2), comm.rank, 2, comm)
    ts.pipeline.PipelineSchedule(stage, 2, loss_fn=lambda out, t: out.sum(), program={0: "F0 B0 F1 B1", 1: "F0 F1 B0 B1"})


def test_a_deadlocking_program_fails_at_once_on_gloo_not_after_the_timeout():
    """The dry run names the deadlock before any message is sent (gloo itself would wait out the timeout)."""
    start = time.monotonic()
    with pytest.raises(ts.DeadlockError, match="rank 0 at B0 .* rank 1 at F1"):
        ts.run(wrong_order, world_size=2, backend="gloo", timeout=60)
    assert time.monotonic() - start < 50
