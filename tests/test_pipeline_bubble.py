"""Bubbles and memory, measured: the timeline of a pipeline run against the closed forms of
``ts.pipeline.bubble_fraction``, and the saved-tensor meter's bytes in flight against ``in_flight``."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tpsp_sim as ts
from tpsp_sim.pipeline import SCHEDULES, bubble, bubble_fraction, dry_run, in_flight, stage_module

FREE_LINKS = ts.Hardware("free links", link_bandwidth=1e30, latency=0.0, peak_flops=1e12)
NAMES = {ts.ScheduleGPipe: "gpipe", ts.Schedule1F1B: "1f1b", ts.ScheduleInterleaved1F1B: "interleaved_1f1b",
         ts.ScheduleZBH1: "zbh1"}


def mse(out, target):
    return ((out - target) ** 2).mean()


def run_uniform(schedule, p, m, v=1, layers_per_chunk=1, count_flops=True):
    """p·v uniform stages of GPT blocks (the loss has no matmul): every stage computes the same FLOPs."""
    torch.manual_seed(0)
    num_stages = p * v
    model = nn.Sequential(*[ts.TransformerBlock(8, 2) for _ in range(num_stages * layers_per_chunk)]).double()
    x, y = torch.randn(2, m, 4, 8, dtype=torch.float64).unbind(0)

    def fn(comm):
        mine = copy.deepcopy(model)
        stages = [ts.PipelineStage(stage_module(list(mine), s, num_stages), s, num_stages, comm)
                  for s in range(comm.rank, num_stages, p)]
        sched = schedule(stages if v > 1 else stages[0], m, loss_fn=mse)
        last = comm.rank == (num_stages - 1) % p
        sched.step(*([x] if comm.rank == 0 else []), **({"target": y} if last else {}))
        return sched.peak_saved_bytes, [dict(s.saved_bytes) for s in stages]

    return ts.run(fn, world_size=p, count_flops=count_flops)


def action_flops(trace, action: str) -> int:
    return sum(c.flops for c in trace.compute if c.rank == 0 and c.scope == f"stage0/{action}")


@pytest.mark.parametrize("schedule,p,m,v", [(ts.ScheduleGPipe, 3, 2, 1), (ts.Schedule1F1B, 3, 5, 1),
                                            (ts.Schedule1F1B, 4, 4, 1), (ts.ScheduleInterleaved1F1B, 2, 4, 2),
                                            (ts.ScheduleInterleaved1F1B, 3, 3, 2)],
                         ids=lambda a: getattr(a, "__name__", a))
def test_measured_bubble_is_the_closed_form(schedule, p, m, v):
    """Idle fraction of every rank on the timeline: (p−1)/(m+p−1), interleaved (p−1)/(v·m+p−1)."""
    res = run_uniform(schedule, p, m, v)
    tl = ts.timeline(res.trace, FREE_LINKS)
    expected = bubble_fraction(NAMES[schedule], p, m, v)
    assert expected == pytest.approx((p - 1) / ((v * m if v > 1 else m) + p - 1), abs=1e-15)
    for r in range(p):
        assert tl.bubble(r) == pytest.approx(expected, abs=1e-9), r


def test_zero_bubble_h1_bubble_is_smaller_by_the_weight_gradients():
    """ZB-H1: (p−1)(F+B−W) idle per rank instead of 1F1B's (p−1)(F+B+W), F, B, W the measured FLOPs
    of one stage's action (its B the input gradient only; attention puts more in B than in F)."""
    p, m = 3, 6
    zb = run_uniform(ts.ScheduleZBH1, p, m)
    one = run_uniform(ts.Schedule1F1B, p, m)
    f, b, w = (action_flops(zb.trace, a) for a in ("F0", "B0", "W0"))
    assert action_flops(one.trace, "B0") == b + w  # the split computes the same backward, no more
    assert w == pytest.approx(f, rel=0.1) and b > f  # linears: dW as much as F; attention's backward is all B
    zb_tl, one_tl = ts.timeline(zb.trace, FREE_LINKS), ts.timeline(one.trace, FREE_LINKS)
    idle = (p - 1) * (f + b - w)
    for r in range(p):
        assert zb_tl.bubble(r) == pytest.approx(idle / (m * (f + b + w) + idle), abs=1e-9)
        assert one_tl.end() - zb_tl.end() == pytest.approx((p - 1) * 2 * w / FREE_LINKS.peak_flops, rel=1e-9)


@pytest.mark.parametrize("schedule,p,m,v", [(ts.ScheduleGPipe, 3, 5, 1), (ts.Schedule1F1B, 3, 5, 1),
                                            (ts.Schedule1F1B, 4, 2, 1), (ts.ScheduleZBH1, 3, 5, 1),
                                            (ts.ScheduleInterleaved1F1B, 2, 4, 2),
                                            (ts.ScheduleInterleaved1F1B, 3, 6, 2)],
                         ids=lambda a: getattr(a, "__name__", a))
def test_peak_activations_in_flight_on_stage_0(schedule, p, m, v):
    """Stage 0 keeps m micro-batches (GPipe), min(p, m) (1F1B, ZB-H1), p(1 + (p−1)/(p·v)) interleaved."""
    res = run_uniform(schedule, p, m, v, count_flops=False)
    peak, saved = res.outputs[0]
    per_chunk = {b for chunk in saved for b in chunk.values()}
    assert len(per_chunk) == 1  # every micro-batch of every chunk saves the same bytes
    expected = in_flight(NAMES[schedule], p, m, v)
    assert expected == {"gpipe": m, "1f1b": min(p, m), "zbh1": min(p, m),
                        "interleaved_1f1b": p * (1 + (p - 1) / (p * v))}[NAMES[schedule]]
    assert peak == pytest.approx(expected * v * per_chunk.pop(), abs=1e-6)


def test_interleaving_costs_megatrons_factor_over_1f1b():
    """Same model, same p and m: the interleaved stage 0 peaks at 1 + (p−1)/(p·v) times 1F1B's bytes."""
    p, m, v = 2, 4, 2
    inter = run_uniform(ts.ScheduleInterleaved1F1B, p, m, v, count_flops=False).outputs[0][0]
    plain = run_uniform(ts.Schedule1F1B, p, m, 1, layers_per_chunk=v, count_flops=False).outputs[0][0]
    assert inter / plain == pytest.approx(1 + (p - 1) / (p * v), abs=1e-12)


def test_closed_forms_reject_impossible_layouts():
    with pytest.raises(ValueError, match="unknown schedule 'zb-v'"):
        bubble_fraction("zb-v", 2, 4)
    with pytest.raises(ValueError, match="v = 1 unless interleaved"):
        in_flight("1f1b", 2, 4, v=2)
    with pytest.raises(ValueError, match="n_microbatches=1 must be at least"):
        in_flight("interleaved_1f1b", 2, 1, v=2)


@settings(max_examples=20, deadline=None)
@given(p=st.integers(1, 5), m=st.integers(1, 12), v=st.integers(2, 3), f=st.floats(0.5, 2), b=st.floats(0.5, 2),
       w_share=st.floats(0.1, 1))
def test_every_schedule_runs_dry_without_deadlock_at_its_closed_form(p, m, v, f, b, w_share):
    """Any p, m, stage times: no deadlock, every rank idles the closed form (interleaved when m >= p splits
    into equal rounds; ZB-H1 when m >= p and W <= min(F, B)), and stage 0 keeps ``in_flight`` micro-batches."""
    w = w_share * min(f, b)
    costs = {"F": f, "B": b, "W": w}
    cases = [("gpipe", 1), ("1f1b", 1)] + ([("zbh1", 1)] if m >= p else [])
    if m >= p and m % (m // p) == 0:
        cases.append(("interleaved_1f1b", v))
    for name, chunks in cases:
        program = SCHEDULES[name].make_program(p, m, chunks)
        slots = dry_run(program, p, chunks, m, costs)
        idle = (p - 1) * (f + b - w)
        want = idle / (m * (f + b + w) + idle) if name == "zbh1" else bubble_fraction(name, p, m, chunks)
        assert all(x == pytest.approx(want, abs=1e-9) for x in bubble(slots).values()), name
        live = peak = 0
        for a in program[0]:
            live += {"F": 1, "B": 0 if name == "zbh1" else -1, "W": -1}[a.kind]
            peak = max(peak, live)
        assert peak / chunks == pytest.approx(in_flight(name, p, m, chunks), abs=1e-12), name
