"""The sweep keeps the two rates of a training step apart: activations on every micro-batch, the
gradient reduction once per optimizer step (issue 21 item 4). Closed forms, per rank, p ranks, one block
of N = b·s·h·e activation bytes and P = 12h² + 13h parameters:
TP 8(p−1)/p·N per micro-batch and no reduction; a context-parallel kind 2(p−1)/p·P·e per step."""

from __future__ import annotations

import math

import pytest
import torch

from tpsp_sim import cost
from tpsp_sim.analysis.sweep import Config, measure

TOY = cost.Hardware("toy", link_bandwidth=1e9, latency=1e-7, peak_flops=32e9)


@pytest.mark.parametrize("p", [2, 3])
def test_activations_per_micro_batch_and_gradients_per_step(p):
    cfg = Config(world_size=p, seq=12 * p, hidden=12, heads=6, dtype=torch.float32, device="meta")
    n_bytes, params = cfg.seq * cfg.hidden * 4, 12 * 12 * 12 + 13 * 12
    tp, ulysses = measure("tp", cfg, TOY), measure("ulysses", cfg, TOY)
    assert tp.activation == pytest.approx(8 * (p - 1) / p * n_bytes, rel=1e-12) and tp.grad_sync == 0
    assert ulysses.activation == pytest.approx(8 * (p - 1) / p * n_bytes / p, rel=1e-12)
    assert ulysses.grad_sync == pytest.approx(2 * (p - 1) / p * params * 4, rel=1e-12)
    assert ulysses.grad_seconds == pytest.approx(cost.collective_time("all_reduce", params * 4, p, TOY), rel=1e-12)
    for pt in (tp, ulysses):
        assert pt.sent == pytest.approx(pt.activation + pt.grad_sync, rel=1e-12)
        # 4 micro-batches: four times the activations, the reduction once
        assert pt.step_bytes(4) == pytest.approx(4 * pt.activation + pt.grad_sync, rel=1e-12)
        assert pt.step_exposed(4) == pytest.approx(4 * pt.exposed + pt.grad_seconds, rel=1e-12)
    # every Ulysses call blocks and the reduction comes last: its parts add up to the whole timeline
    whole = max(ulysses.timeline.comm(r) for r in range(p))
    assert math.isclose(ulysses.seconds + ulysses.grad_seconds, whole, rel_tol=1e-12)
    assert ulysses.exposed == pytest.approx(ulysses.seconds, rel=1e-12)
