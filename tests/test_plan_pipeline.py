"""ts.plan with pipeline parallelism and the ZeRO stage: pp = 1 as before, the step of a pipeline by hand, the
bubble against a dry run of the schedule's program, ZeRO 3's weight gathers against the ZeRO paper's bytes."""

from __future__ import annotations

import pytest

import tpsp_sim as ts
from tpsp_sim.analysis.models import Model
from tpsp_sim.analysis.planner import evaluate, plan, table
from tpsp_sim.analysis.step_costs import gradient_sync_time, pipeline_transfer_time, weight_gather_exposed
from tpsp_sim.core.ops import wire_bytes
from tpsp_sim.pipeline import SCHEDULES, dry_run

TINY = Model("tiny", 4, 64, 4, 2, 128, 100)
FAST = ts.cost.Link("fast", bandwidth=1e9, latency=1e-6)
SLOW = ts.cost.Link("slow", bandwidth=1e8, latency=1e-5)
PAIRS = ts.cost.Cluster("pairs", peak_flops=1e12, gpus_per_node=2, intra_node=FAST, inter_node=SLOW, memory_bytes=1e9)
BATCH = dict(global_batch_tokens=8 * 256, reserve=0)
OPTIONS = dict(**BATCH, attentions=("ring",))


@pytest.fixture(scope="module")
def tiny_plans():
    return plan(TINY, 256, 4, PAIRS, zero=(0, 1, 2, 3), **OPTIONS)


def key(p):
    return p.pp, p.dp, p.cp, p.tp, p.v, p.attention, p.recompute, p.zero


def test_pp_1_plans_are_the_plans_without_pipeline(tiny_plans):
    """Searching pp leaves every pp = 1 plan as a search of pp = 1 alone prices it, bit for bit; the search
    covers every (pp, dp, cp, tp) of 4 GPUs whose pp splits the 4 layers, and v = 2 where 2·pp does too."""
    alone = plan(TINY, 256, 4, PAIRS, zero=(0, 1, 2, 3), pp=1, **OPTIONS)
    assert [p for p in tiny_plans if p.pp == 1] == alone
    assert {(p.pp, p.v) for p in tiny_plans} == {(1, 1), (2, 1), (2, 2), (4, 1)}
    assert tiny_plans == plan(TINY, 256, 4, PAIRS, zero=(0, 1, 2, 3), **OPTIONS)  # deterministic
    assert {p.zero for p in tiny_plans if p.runs} == {0, 1, 2, 3}
    head = table(tiny_plans, 3).splitlines()[0]
    assert head.startswith("| # | pp | dp | cp | tp | v | m | zero |") and "exposed pp" in head and "bubble" in head


def test_a_pipeline_step_by_hand(tiny_plans):
    """pp = 2, dp = 2, cp = tp = 1 on nodes of 2 GPUs: m = 8 sequences / dp = 4 micro-batches, 2 of the 4 layers per
    rank. Compute: half the layer passes of the same (dp, cp, tp) without pipeline. Each micro-batch sends its
    activation forward and its gradient back across the one boundary, ranks 0 and dp·cp·tp = 2 on two nodes:
    s·b·h·2 = 256 · 64 · 2 = 32,768 bytes at 1e8 B/s after α = 1e-5, twice per micro-batch. The 1F1B bubble
    stretches the busy time by (p − 1)/m = 1/4. The gradients of the worst stage's parameters synchronise over
    dp = 2 inside a node."""
    p = next(p for p in tiny_plans if key(p) == (2, 2, 1, 1, 1, "-", "selective", 1))
    flat = evaluate(TINY, 256, PAIRS, 2, 1, 1, recompute="selective", **BATCH)  # 2 GPUs, no pipeline
    assert (p.microbatches, flat.microbatches, p.schedule) == (4, 4, "1f1b")
    assert p.compute == pytest.approx(flat.compute / 2, rel=1e-12)
    hop = 1e-5 + 32_768 / 1e8
    assert pipeline_transfer_time(TINY, 256, 1, 1, 1, SLOW) == pytest.approx(hop, rel=1e-12)
    assert p.exposed["pp"] == pytest.approx(2 * 4 * hop, rel=1e-12)
    busy = p.compute + p.exposed["tp"] + p.exposed["cp"] + p.exposed["pp"] + p.idle
    assert p.bubble == pytest.approx(busy / 4, rel=1e-12)
    assert p.exposed["dp_cp"] == pytest.approx(gradient_sync_time(p.memory.parameters, 1, 4, 2, FAST), rel=1e-12)
    assert p.step_time == pytest.approx(busy * (4 + 1) / 4 + p.exposed["dp_cp"], rel=1e-12)


@pytest.mark.parametrize("pp, v", [(2, 1), (2, 2), (4, 1)])
def test_the_bubble_is_the_dry_run_of_the_schedule(tiny_plans, pp, v):
    """The bubble the planner adds equals the idle time of the schedule's program run without tensors
    (``ts.pipeline.dry_run``) with every chunk's F and B taking its share of the busy time."""
    p = next(p for p in tiny_plans if key(p)[:5] == (pp, 4 // pp, 1, 1, v) and p.recompute == "selective"
             and p.zero == 1)
    busy = p.compute + p.exposed["tp"] + p.exposed["cp"] + p.exposed["pp"] + p.idle
    m = p.microbatches
    chunk = busy / (m * v)  # one micro-batch through one chunk, forward and backward
    slots = dry_run(SCHEDULES[p.schedule].make_program(pp, m, v), pp, v, m, {"F": chunk / 2, "B": chunk / 2, "W": 0})
    makespan = max(s.end for s in slots)
    assert busy + p.bubble == pytest.approx(makespan, rel=1e-12)


def test_zero_stages_trade_memory_for_bytes(tiny_plans):
    """Per parameter held, ZeRO 0 ... 3 over dp·cp = 4 keep 18, 6 + 12/4, 2 + 16/4 and 18/4 bytes. ZeRO 3 waits for
    its per-layer weight gathers where the layer's compute does not cover them; ZeRO 2 and 3 reduce-scatter the
    gradients after each of the m micro-batches."""
    by_zero = {p.zero: p for p in tiny_plans if key(p)[:7] == (1, 4, 1, 1, 1, "-", "selective")}
    n = by_zero[0].memory.parameters
    for z, per_parameter in ((0, 18), (1, 6 + 12 / 4), (2, 2 + 16 / 4), (3, 18 / 4)):
        assert by_zero[z].memory.states == pytest.approx(per_parameter * n, rel=1e-12)
    link = PAIRS.link(range(4))
    m = by_zero[2].microbatches
    assert m == 2
    assert by_zero[2].exposed["dp_cp"] == pytest.approx(gradient_sync_time(n, 2, 4, 4, link, m), rel=1e-12)
    assert by_zero[2].exposed["dp_cp"] > by_zero[1].exposed["dp_cp"]
    gathers = by_zero[3].exposed["dp_cp"] - by_zero[2].exposed["dp_cp"]
    assert gathers > 0
    fully_exposed = m * TINY.n_layers * weight_gather_exposed(TINY.layer_parameters(), 4, link, 0.0, 0.0)
    assert 0 < gathers <= fully_exposed  # prefetched: what the layer's compute does not cover


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_zero_3_bytes_are_the_zero_papers(p):
    """Per layer and step (one micro-batch), each rank sends Ψ(p−1)/p in each of the two weight all-gathers that
    ``weight_gather_exposed`` prices and in the gradients' reduce-scatter: 3Ψ(p−1)/p, ``zero_bytes_per_step``."""
    psi = 2 * 1536 * p  # bf16 bytes of a layer whose parameters split over p
    gather = wire_bytes("all_gather", psi // p, p)[0]
    scatter = wire_bytes("reduce_scatter", psi, p)[0]
    assert 2 * gather + scatter == ts.zero_bytes_per_step(psi, p, 3)
    link = ts.cost.Link("l", bandwidth=1e9, latency=0.0)
    assert weight_gather_exposed(psi / 2, p, link, 0.0, 0.0) == pytest.approx(2 * gather / 1e9, rel=1e-12)
    assert weight_gather_exposed(psi / 2, p, link, 1.0, 1.0) == 0.0  # hidden behind a second of compute


def test_search_controls_and_bad_input():
    """pp fixes the pipeline, max_pp caps it; v needs interleaving room (m >= pp); bad values say which."""
    fixed = plan(TINY, 256, 4, PAIRS, pp=2, **OPTIONS)
    assert {p.pp for p in fixed} == {2}
    assert {p.pp for p in plan(TINY, 256, 4, PAIRS, max_pp=2, **OPTIONS)} == {1, 2}
    odd = Model("odd", 3, 64, 4, 2, 128, 100)
    rows = [p for p in plan(odd, 256, 4, PAIRS, pp=2, **OPTIONS)]
    assert rows and all(not p.fits and "n_layers=3 does not split into pp=2 stages" in p.why for p in rows)
    assert evaluate(TINY, 256, PAIRS, 1, 1, 1, pp=2, virtual_stages=2, zero=3, **BATCH).v == 2
    with pytest.raises(ValueError, match="virtual_stages=2 does not run on pp=4"):
        evaluate(TINY, 256, PAIRS, 1, 1, 1, pp=4, virtual_stages=2, **BATCH)
    for bad, match in (({"zero": 4}, "zero must be one of"), ({"virtual_stages": (0,)}, "virtual_stages must be"),
                       ({"max_pp": 0}, "max_pp must be >= 1"), ({"pp": 3}, "pp=3 must be a positive divisor")):
        with pytest.raises(ValueError, match=match):
            plan(TINY, 256, 4, PAIRS, **{**OPTIONS, **bad})


@pytest.mark.parametrize("flags, match", [
    (["--pp", "0"], "--pp: 0 must be >= 1"),
    (["--max-pp", "-2"], "--max-pp: -2 must be >= 1"),
    (["--virtual-stages", "1", "0"], "--virtual-stages: 0 must be >= 1"),
    (["--zero", "1", "5"], "--zero: invalid choice: 5"),
    (["--tp", "x"], "--tp: 'x' is not an integer"),
    (["--pp", "3"], "pp=3 must be a positive divisor of gpus=4"),
])
def test_plan_command_rejects_bad_pipeline_flags(tmp_path, capsys, flags, match):
    from tpsp_sim.__main__ import main
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--model", "custom", "--layers", "4", "--d-model", "64", "--heads", "4", "--ffn", "128",
              "--vocab", "100", "--seq", "256", "--gpus", "4", *flags, "--out", str(tmp_path / "plan")])
    assert exit_.value.code == 2 and match in capsys.readouterr().err


def test_llama3_405b_on_too_few_gpus_says_what_would_fit(tmp_path, capsys):
    """405.9B parameters need 18 bytes each, 7.3 TB: on 64 GPUs even ZeRO 3 over all of them leaves 114 GB per GPU.
    The CLI says nothing fits, exits 1, and names the fewest GPUs on which a split fits (ZeRO 3 over 128)."""
    from tpsp_sim.__main__ import main
    from tpsp_sim.analysis.planner import fewest_gpus
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--model", "llama3-405b", "--seq", "8192", "--gpus", "64", "--attentions", "ring",
              "--recompute", "full", "--zero", "1", "3", "--virtual-stages", "1", "--workers", "1", "--top", "2",
              "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert exit_.value.code == 1 and not (tmp_path / "plans.png").exists()
    fewest = fewest_gpus("llama3-405b", 8192, "dgx-h100", gpus=64)
    assert fewest.fits and fewest.zero == 3 and fewest.pp * fewest.dp * fewest.cp * fewest.tp == 128
    assert 18 * ts.analysis.models.MODELS["llama3-405b"].parameters() / 64 > 80 * 2**30
    assert out.startswith("Nothing fits: no split of Llama 3 405B, 8192 tokens, 64 GPUs of DGX H100 fits and runs. "
                          f"What would fit: {fewest.why}.")
    assert "fits on 128 GPUs as" in fewest.why


def test_the_plot_stacks_each_pipeline_plans_step(tiny_plans):
    """plot_plans: one bar per plan, its parts (compute, exposed tp / cp / pp / dp×cp, idle, bubble) ending at the
    plan's step time; pipeline plans labelled with pp, v and the ZeRO stage."""
    from tpsp_sim.viz.plan_plot import PARTS, label, plot_plans
    shown = [p for p in tiny_plans if p.runs][:6]
    assert any(p.pp > 1 for p in shown)
    ax = plot_plans(tiny_plans, top=6).axes[0]
    bars = ax.patches
    assert len(bars) == len(PARTS) * len(shown)
    for i, p in enumerate(shown):
        last = bars[len(PARTS) * i + len(PARTS) - 1]
        assert last.get_x() + last.get_width() == pytest.approx(p.step_time, rel=1e-12)
    p = next(p for p in shown if p.pp > 1)
    assert label(p).startswith(f"pp={p.pp} ") and (p.zero == 1) == (", zero" not in label(p))


def test_plan_command_with_a_fixed_pipeline(tmp_path, capsys):
    """--pp 2 --zero 1 3: every row has pp = 2, the headline names the pipeline and the ZeRO stage."""
    from tpsp_sim.__main__ import main
    main(["plan", "--model", "custom", "--layers", "4", "--d-model", "64", "--heads", "4", "--kv-heads", "2",
          "--ffn", "128", "--vocab", "100", "--seq", "256", "--gpus", "4", "--global-batch-tokens", "2048",
          "--pp", "2", "--zero", "1", "3", "--attentions", "ring", "--workers", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith("Best: pp=2 ") and "ZeRO " in out.splitlines()[0]
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows and all(line.split("|")[2].strip() == "2" for line in rows)
    assert (tmp_path / "plans.png").exists()


def test_the_plot_leaves_room_for_its_bars_and_its_legend(tiny_plans):
    """The x axis runs past the longest bar, and the legend sits outside the axes, over no bar (issue 22 §4)."""
    from tpsp_sim.viz.plan_plot import MARGIN, plot_plans
    fig = plot_plans(tiny_plans, top=6)
    ax = fig.axes[0]
    longest = max(p.step_time for p in [p for p in tiny_plans if p.runs][:6])
    assert ax.get_xlim()[1] == pytest.approx((1 + MARGIN) * longest, rel=1e-12)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    legend = fig.legends[0].get_window_extent(renderer)
    assert legend.x0 >= ax.get_window_extent(renderer).x1  # right of the axes: it covers no bar
    assert all(fig.bbox.contains(x, y) for x, y in legend.corners())  # and inside the figure


def test_the_plan_table_renders_as_html_with_the_markdown_cells(tiny_plans):
    """table(fmt="html"): one <tr> per plan under the header, the same cells as the Markdown (one renderer)."""
    import html
    import re
    from tpsp_sim.analysis.planner import table
    markdown = table(tiny_plans, top=3).splitlines()
    page = table(tiny_plans, top=3, fmt="html")
    cells = [html.unescape(c) for c in re.findall(r"<t[hd] [^>]*>(.*?)</t[hd]>", page)]
    expected = [c.strip() for line in markdown[:1] + markdown[2:] for c in line.strip("|").split(" | ")]
    assert page.startswith("<table>") and page.count("<tr>") == 4 and cells == expected
    with pytest.raises(ValueError, match="unknown table format"):
        table(tiny_plans, fmt="pdf")
