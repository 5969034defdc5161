"""ts.plan: deterministic, ranked, priced on the cluster's links; keeps TP inside a node when it can."""

from __future__ import annotations

import multiprocessing.resource_tracker

import pytest
import torch

import tpsp_sim as ts
from tpsp_sim.__main__ import main
from tpsp_sim.analysis.models import Model
from tpsp_sim.analysis.layer import causal_overcount
from tpsp_sim.analysis.planner import plan, table

TINY = Model("tiny", 2, 64, 4, 2, 128, 100)
FAST = ts.cost.Link("fast", bandwidth=1e9, latency=1e-6)
SLOW = ts.cost.Link("slow", bandwidth=1e8, latency=1e-5)
PAIRS = ts.cost.Cluster("pairs", peak_flops=1e12, gpus_per_node=2, intra_node=FAST, inter_node=SLOW, memory_bytes=1e9)


@pytest.fixture(scope="module")
def tiny_plans():
    return plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1)


def test_small_case_is_deterministic_and_ranked(tiny_plans):
    again = plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1)
    assert again == tiny_plans
    fitting = [p for p in tiny_plans if p.fits]
    assert fitting and tiny_plans[:len(fitting)] == fitting  # the plans that fit come first
    times = [p.step_time for p in fitting]
    assert times == sorted(times)
    meshes = {(p.dp, p.cp, p.tp) for p in tiny_plans}
    assert meshes == {(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)}
    lines = table(tiny_plans).splitlines()
    assert lines[0].startswith("| # | pp | dp | cp | tp | v | m | zero | attention | recompute | step time") and len(lines) == 2 + len(tiny_plans)


def test_step_time_by_hand(tiny_plans):
    """dp = 4, cp = tp = 1, one sequence per replica, 2 layers, compute at 0.5 · 1e12 FLOP/s. Per layer and
    sequence of s = 256: matmuls 6 · 36,864 weights · 256 tokens (forward 2, backward 4), causal attention
    forward 2·s²·h and backward 2.5× that: 3.5 · 2 · 256² · 64. Selective: (56,623,104 + 29,360,128) · 2 /
    5e11 = 3.43933e-4 s; full recompute adds the forward, (18,874,368 + 8,388,608) · 2 / 5e11 = 1.09052e-4 s.
    Nothing else but the gradient synchronisation across nodes (test below): 1.97808e-3 s."""
    plans = {p.recompute: p for p in tiny_plans if (p.dp, p.cp, p.tp) == (4, 1, 1)}
    all_reduce = 1.97808e-3
    for mode, compute in (("selective", 3.43933e-4), ("full", 4.52985e-4)):
        p = plans[mode]
        assert p.compute == pytest.approx(compute, rel=1e-5)
        assert (p.exposed["tp"], p.exposed["cp"], p.idle) == (0.0, 0.0, 0.0)
        assert p.step_time == pytest.approx(compute + all_reduce, rel=1e-5)


def test_gradient_sync_is_priced_on_the_replicas_link(tiny_plans):
    """dp = 4 on nodes of 2: the gradient synchronisation crosses nodes, two replicas in each node (two rings,
    two NICs: 2 · 1e8 B/s, α = 1e-5). Parameters by hand: per layer q, o 2·64² + k, v 2·64·32 + SwiGLU
    3·64·128 + norms 128 = 36,992; x 2 + embedding and output 2·100·64 + final norm 64 = 86,848. The
    distributed optimizer (zero=1): reduce_scatter of the fp32 main gradients, 4 · 86,848 = 347,392 bytes, in
    3 steps, one across the two nodes (α) and two inside (α_intra = 1e-6): α + 2α_intra + 3/4 · 347,392 / 2e8;
    all_gather of each replica's bf16 weight shard, 2 · 86,848 / 4 = 43,424 bytes, α + 2α_intra + 3 · 43,424 /
    2e8: 1.97808e-3 s. ZeRO 0: an all_reduce of the fp32 gradients, which on two nodes runs faster as NCCL's
    tree (N across the two NICs, not the ring's 1.5·N; ts.cost): 2·(α_intra + α) + 347,392 / 2e8 / 0.92 =
    1.910e-3 s against the ring's 2α + 4α_intra + 1.5 · 347,392 / 2e8 = 2.630e-3 s."""
    p = next(p for p in tiny_plans if (p.dp, p.cp, p.tp, p.recompute) == (4, 1, 1, "selective"))
    assert p.memory.parameters == 86_848
    assert p.exposed["dp_cp"] == pytest.approx(2 * (1e-5 + 2e-6) + 0.75 * 347_392 / 2e8 + 3 * 43_424 / 2e8, rel=1e-12)
    assert p.exposed["dp_cp"] == pytest.approx(1.97808e-3, rel=1e-12)
    plain = plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1, zero=0, attentions=("ring",),
                 recompute=("selective",))
    q = next(q for q in plain if (q.dp, q.cp, q.tp) == (4, 1, 1))
    assert q.exposed["dp_cp"] == pytest.approx(2 * (1e-6 + 1e-5) + 347_392 / 2e8 / 0.92, rel=1e-12)
    assert q.exposed["dp_cp"] < 2e-5 + 4e-6 + 1.5 * 347_392 / 2e8
    assert q.memory.states == 18 * 86_848 and p.memory.states == (6 + 12 / 4) * 86_848


def test_causal_attention_is_charged_the_same_work_whatever_the_split(tiny_plans):
    """Every GPU does 1/4 of the same causal work per step: cp = 1, ring and Ulysses compute alike once the
    masked halves of diagonal tiles are discounted (causal_overcount)."""
    computes = {(p.cp, p.attention): p.compute for p in tiny_plans
                if p.tp == 1 and p.recompute == "selective" and p.runs}
    assert len(computes) >= 4
    first = next(iter(computes.values()))
    assert all(c == pytest.approx(first, rel=1e-9) for c in computes.values()), computes


def test_overlap_tp_hides_part_of_tensor_parallelism(tiny_plans):
    """Megatron's overlap of TP's backward all-gathers and reduce-scatters with the matmuls beside them shortens TP
    plans only (the compute is the same, summed in another order)."""
    overlapped = plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1, overlap_tp=True)
    before = {(p.dp, p.cp, p.tp, p.attention, p.recompute): p for p in tiny_plans if p.runs}
    for p in (p for p in overlapped if p.runs):
        q = before[p.dp, p.cp, p.tp, p.attention, p.recompute]
        if p.tp == 1:
            assert p.step_time == q.step_time
        else:
            assert p.exposed["tp"] < q.exposed["tp"] and p.compute == pytest.approx(q.compute, rel=1e-12)


def full_mesh_step(comm, dense, dp, cp, tp, seq, parameters):
    """One layer on the whole (dp, cp, tp) mesh, then the distributed optimizer's gradient synchronisation over
    dp·cp (reduce-scatter the fp32 main gradients, all-gather the bf16 weight shards): what plan prices from
    a (cp, tp) simulation and a closed form."""
    mesh = ts.init_device_mesh(comm, (dp, cp, tp), mesh_dim_names=("dp", "cp", "tp"))
    block = ts.ParallelTransformerBlock.from_dense(dense, tp=mesh["tp"], cp=mesh["cp"], attention="ring")
    x = torch.empty(1, seq // cp // tp, dense.d_model, dtype=torch.bfloat16, device="meta", requires_grad=True)
    block(x).float().sum().backward()
    replicas = mesh["dp", "cp"]
    replicas.reduce_scatter(torch.empty(parameters, dtype=torch.float32, device="meta"))
    replicas.all_gather(torch.empty(parameters // (dp * cp), dtype=torch.bfloat16, device="meta"))


@pytest.mark.parametrize("dp, cp, tp", [(2, 2, 1), (2, 1, 2)])
def test_plan_equals_a_full_mesh_simulation(tiny_plans, dp, cp, tp):
    """The planner simulates one (cp, tp) slice and adds the dp·cp gradient synchronisation in closed form;
    simulating every rank of the (dp, cp, tp) mesh gives the same exposed communication per axis."""
    p = next(p for p in tiny_plans if (p.dp, p.cp, p.tp, p.attention, p.recompute)
             == (dp, cp, tp, "ring" if cp > 1 else "-", "selective"))
    with torch.device("meta"):
        dense = ts.LlamaBlock(TINY.d_model, TINY.n_heads, TINY.n_kv_heads, TINY.d_ff).to(torch.bfloat16)
    trace = ts.run(full_mesh_step, dense, dp, cp, tp, 256, int(p.memory.parameters), world_size=dp * cp * tp,
                   count_flops=True).trace
    tl = ts.timeline(trace, PAIRS, mfu=0.5)
    per_step = 4 // dp * TINY.n_layers  # layer passes per step: 4 sequences over dp replicas, 2 layers
    for r in tl.ranks:
        exposed = tl.exposed_by_axis(r)
        assert exposed["dp_cp"] == pytest.approx(p.exposed["dp_cp"], rel=1e-12)
        for axis in ("tp", "cp"):
            assert per_step * exposed.get(axis, 0.0) == pytest.approx(p.exposed[axis], rel=1e-12, abs=1e-15), axis


@pytest.fixture(scope="module")
def resource_tracker():
    """multiprocessing's resource tracker, which a spawned pool starts once and which lives as long as pytest:
    started before the test, so the check for leftover child processes does not count it."""
    multiprocessing.resource_tracker.ensure_running()


def test_workers_give_the_same_plans(tiny_plans, resource_tracker):
    from tpsp_sim.analysis.planner import clear_cache
    clear_cache()  # simulate again, in the workers
    assert plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1, workers=2) == tiny_plans


def test_causal_overcount_by_hand():
    m = Model("m", 1, 64, 4, 4, 128, 10)  # d = 16
    assert causal_overcount(m, 64, 2, 1, "ring") == (2 * 32**2 * 16 * 4, 2.5 * 2 * 32**2 * 16 * 4)  # n = 32
    assert causal_overcount(m, 64, 2, 1, "ulysses") == (2 * 64**2 * 16 * 2, 1.5 * 2 * 64**2 * 16 * 2)  # 2 heads, 64
    assert causal_overcount(m, 64, 4, 2, "usp", 2) == (2 * 32**2 * 16 * 1, 2.5 * 2 * 32**2 * 16 * 1)


def test_plans_that_do_not_fit_say_why():
    small = ts.cost.Cluster("small", 1e12, 2, FAST, SLOW, memory_bytes=1e5)
    plans = plan(TINY, 256, 4, small, global_batch_tokens=4 * 256, reserve=0, pp=1)
    assert not any(p.fits for p in plans) and not any(p.runs for p in plans)
    assert all(p.why.startswith("needs ") and "of 0 GiB" in p.why for p in plans)  # 1e5 bytes: 0.0001 GiB
    with pytest.raises(ValueError, match="unknown attention or recompute"):
        plan(TINY, 256, 4, PAIRS, attentions=("flash",))


def test_plan_command_prints_the_table_and_saves_the_plot(tmp_path, capsys, resource_tracker):
    main(["plan", "--model", "custom", "--layers", "2", "--d-model", "64", "--heads", "4", "--kv-heads", "2",
          "--ffn", "128", "--vocab", "100", "--seq", "256", "--gpus", "2", "--cluster", "dgx-h100",
          "--global-batch-tokens", "512", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| # | pp | dp | cp | tp |" in out and "Ignored: the zero-bubble" in out
    assert (tmp_path / "plans.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # every split of 64 GPUs, pp included
def test_llama3_70b_at_128k_keeps_tensor_parallelism_inside_a_dgx_node():
    plans = plan("llama3-70b", 131072, 64, "dgx-h100")
    inside = [p for p in plans if p.fits and p.tp <= 8]
    assert inside, "some plan with TP inside a node fits"
    best = plans[0]
    assert best.fits and best.tp <= 8, table(plans, 5)


def test_search_space_controls_and_evaluate(tiny_plans):
    """Fixed axes, max_tp and tp_within_node narrow the meshes; evaluate() prices one split as plan() does."""
    from tpsp_sim.analysis.planner import evaluate
    options = dict(global_batch_tokens=4 * 256, reserve=0, pp=1)
    meshes = lambda plans: {(p.dp, p.cp, p.tp) for p in plans}
    assert meshes(plan(TINY, 256, 4, PAIRS, max_tp=1, **options)) == {(4, 1, 1), (2, 2, 1), (1, 4, 1)}
    assert meshes(plan(TINY, 256, 4, PAIRS, tp_within_node=True, **options)) == \
           {(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2)}  # tp = 4 spans two 2-GPU nodes
    assert meshes(plan(TINY, 256, 4, PAIRS, cp=2, **options)) == {(2, 2, 1), (1, 2, 2)}
    one = evaluate(TINY, 256, PAIRS, 2, 2, 1, attention="ulysses", recompute="full", **options)
    expected = next(p for p in tiny_plans if (p.dp, p.cp, p.tp, p.attention, p.recompute) == (2, 2, 1, "ulysses", "full"))
    assert one == expected
    with pytest.raises(ValueError, match="cp=3 must be a positive divisor of gpus=4"):
        plan(TINY, 256, 4, PAIRS, cp=3, **options)
    with pytest.raises(ValueError, match="no \\(pp, dp, cp, tp\\) of 4 GPUs satisfies"):
        plan(TINY, 256, 4, PAIRS, tp=4, max_tp=2, **options)


def test_a_second_plan_of_the_same_case_simulates_nothing(monkeypatch):
    """Layers are simulated once per case and shape; another memory setting re-plans from the cache."""
    from tpsp_sim.analysis import layer as layer_module, planner as plan_module
    first = plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1)
    monkeypatch.setattr(layer_module, "symmetric_layer", lambda *a, **k: pytest.fail("simulated again"))
    again = plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1, zero=0)
    assert {(p.dp, p.cp, p.tp, p.attention, p.recompute) for p in again} == \
           {(p.dp, p.cp, p.tp, p.attention, p.recompute) for p in first}
    plan_module.clear_cache()
    with pytest.raises(pytest.fail.Exception, match="simulated again"):
        plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1)


def test_attention_at_its_own_efficiency(tiny_plans):
    """dp = 4, cp = tp = 1: the causal attention core is 2·256²·16·4 = 8,388,608 FLOPs forward and 2.5× that
    backward per layer and sequence; at 1.0 of peak instead of mfu 0.5 each of the 2 layer passes saves
    29,360,128 · (2e-12 − 1e-12) s. Default (None): the same plans as one MFU for all compute."""
    from tpsp_sim.analysis.layer import causal_attention_flops
    assert causal_attention_flops(TINY, 256, 1, 1) == (8_388_608, 2.5 * 8_388_608)
    assert causal_attention_flops(TINY, 256, 2, 2) == (8_388_608 / 4, 2.5 * 8_388_608 / 4)
    faster = plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1, attention_efficiency=1.0)
    key = lambda p: (p.dp, p.cp, p.tp, p.attention, p.recompute)
    before = {key(p): p for p in tiny_plans}
    for mode, passes in (("selective", 2), ("full", 2)):
        p = next(p for p in faster if key(p) == (4, 1, 1, "-", mode))
        saved = passes * (1 if mode == "selective" else 8_388_608 / 29_360_128 + 1) * 29_360_128 * 1e-12
        assert before[key(p)].compute - p.compute == pytest.approx(saved, rel=1e-9)
    for bad in (0, 2.5, (0.5,), (0.5, -1), "fa9-h100", True):
        with pytest.raises(ValueError, match="attention_efficiency"):
            plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1, attention_efficiency=bad)


def test_attention_forward_and_backward_at_their_own_speeds(tiny_plans):
    """A (forward, backward) pair prices them apart: dp = 4, cp = tp = 1, selective, 2 layer passes; forward
    8,388,608 FLOPs at 0.25 instead of 0.5 of 1e12 costs 2 · 8,388,608 · (4e-12 − 2e-12) s more, backward
    20,971,520 at 1.0 saves 2 · 20,971,520 · (2e-12 − 1e-12) s. A published kernel is its two shares:
    FlashAttention-3 on H100, 616 and 561 TFLOP/s of 989; the FP8 kernel's backward is taken at its forward's."""
    from tpsp_sim.analysis.kernels import ATTENTION_KERNELS
    split = plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1, attention_efficiency=(0.25, 1.0),
                 recompute=("selective",))
    p = next(p for p in split if (p.dp, p.cp, p.tp) == (4, 1, 1))
    q = next(q for q in tiny_plans if (q.dp, q.cp, q.tp, q.recompute) == (4, 1, 1, "selective"))
    assert p.compute - q.compute == pytest.approx(2 * 8_388_608 * 2e-12 - 2 * 20_971_520 * 1e-12, rel=1e-9)
    fa3 = ATTENTION_KERNELS["fa3-h100-bf16"]
    assert (fa3.forward, fa3.backward) == (616 / 989, 561 / 989)
    fp8 = ATTENTION_KERNELS["fa3-h100-fp8"]
    assert fp8.forward == fp8.backward == 1171 / 989 > 1
    by_key = plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1, attention_efficiency="fa3-h100-bf16")
    assert by_key == plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1,
                          attention_efficiency=(616 / 989, 561 / 989))


def test_overlap_tp_searched_both_ways(tiny_plans):
    """overlap_tp=(False, True) prices every split both ways, each plan recording which: its off half is the
    default plans exactly, its on half the overlap_tp=True plans; the table shows the column only then."""
    both = plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1, overlap_tp=(False, True))
    on = plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1, overlap_tp=True)
    runs = lambda plans: [p for p in plans if p.runs]
    assert [p for p in runs(both) if not p.overlap_tp] == runs(tiny_plans)
    assert [p for p in runs(both) if p.overlap_tp] == runs(on) and all(p.overlap_tp for p in on)
    assert "overlap tp" in table(both).splitlines()[0] and "overlap tp" not in table(tiny_plans).splitlines()[0]
    assert both == plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1, overlap_tp=[False, True])
    for bad in ((), "yes", (True, 1), None):
        with pytest.raises(ValueError, match="overlap_tp must be a bool"):
            plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1, overlap_tp=bad)


def test_micro_batches_searched():
    """micro_batch=(1, 2) on 4 sequences, dp = 2: m = 4 / (2·1) = 2 micro-batches of one sequence, or
    4 / (2·2) = 1 of two; dp = 4 does not split into micro-batches of 2 (one row saying so). Each size's plans
    are the plans of that size alone, and one micro-batch of 2 sequences computes as much per step as two of 1."""
    sizes = dict(global_batch_tokens=4 * 256, reserve=0, pp=1, attentions=("ring",), recompute=("selective",))
    both = plan(TINY, 256, 4, PAIRS, micro_batch=(1, 2), **sizes)
    ones, twos = (plan(TINY, 256, 4, PAIRS, micro_batch=b, **sizes) for b in (1, 2))
    assert sorted(both, key=repr) == sorted(ones + twos, key=repr)
    assert {p.micro_batch for p in ones} == {1} and {p.micro_batch for p in twos} == {2}
    by = {(p.micro_batch, p.dp, p.cp, p.tp): p for p in both}
    assert by[1, 2, 2, 1].microbatches == 2 and by[2, 2, 2, 1].microbatches == 1
    assert by[2, 4, 1, 1].why == "the batch of 4 sequences does not split into dp=4 × micro_batch=2"
    assert by[2, 2, 1, 2].compute == pytest.approx(by[1, 2, 1, 2].compute, rel=1e-9)
    assert "| b |" in table(both) and "| b |" not in table(ones)
    assert both == plan(TINY, 256, 4, PAIRS, micro_batch=[1, 2], **sizes)  # deterministic
    with pytest.raises(ValueError, match="micro_batch must be an int"):
        plan(TINY, 256, 4, PAIRS, micro_batch=(1, 0), **sizes)


def test_automatic_workers_spawn_only_for_large_searches(monkeypatch):
    """workers=None runs a small search in this process (spawning processes that import torch costs more than
    the simulations); from PROCESSES_FROM simulations on, one process per CPU. Bad counts are named."""
    from tpsp_sim.analysis import planner as plan_module
    assert plan_module._workers(None, plan_module.PROCESSES_FROM - 1) == 1
    monkeypatch.setattr(plan_module, "default_workers", lambda: 7)
    assert plan_module._workers(None, plan_module.PROCESSES_FROM) == 7 and plan_module._workers(3, 1) == 3
    plan_module.clear_cache()
    monkeypatch.setattr(plan_module, "ProcessPoolExecutor", lambda *a, **k: pytest.fail("spawned processes"))
    assert len(plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1, workers=None)) > 0
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers must be a positive int or None"):
            plan(TINY, 256, 4, PAIRS, global_batch_tokens=4 * 256, reserve=0, pp=1, workers=bad)
