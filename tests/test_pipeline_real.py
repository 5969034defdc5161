"""A pipeline on real torch.distributed: two gloo processes run a 1F1B step whose gradients and trace
(every send and receive, in order, with scope, phase and bytes) equal the simulator's."""

from __future__ import annotations

import copy

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
