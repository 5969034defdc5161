"""Every figure renders (Agg) from real traces, and what it draws adds up to the trace's totals."""

import io

import matplotlib
import numpy as np
import pytest
import torch

import tpsp_sim as ts
from tpsp_sim import cost
from tpsp_sim.viz import plot
from tpsp_sim.analysis.sweep import Config, measure
from tpsp_sim import timeline

matplotlib.use("Agg")

TOY = cost.Hardware("toy", link_bandwidth=1e9, latency=1e-7, peak_flops=32e9)


def render(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=40)
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    return buffer.getvalue()


def bar_heights(ax) -> dict[str, np.ndarray]:
    """{legend label: heights of its bars, one per x tick}."""
    return {c.get_label(): np.array([bar.get_height() for bar in c]) for c in ax.containers}


def block_fn(comm, dense, x, mode):
    block = ts.ParallelTransformerBlock.from_dense(dense, comm, mode)
    x = x.chunk(comm.world_size, 1)[comm.rank] if mode == "tp_sp" else x
    block(x.clone().requires_grad_()).sum().backward()


@pytest.fixture(scope="module", params=[(2, "tp"), (3, "tp_sp"), (4, "tp_sp")], ids=str)
def block_trace(request):
    p, mode = request.param
    torch.manual_seed(0)
    dense = ts.TransformerBlock(12, 6 if p == 3 else 4, d_ff=24).double()
    x = torch.randn(2, 12, 12, dtype=torch.float64)
    return p, ts.run(block_fn, dense, x, mode, world_size=p).trace


def test_plot_comm_bars_add_up_to_the_trace_totals(block_trace):
    p, trace = block_trace
    fig = plot.plot_comm(trace, TOY)
    render(fig)
    bytes_ax, time_ax = fig.axes[0], fig.axes[1]
    scopes = [t.get_text() for t in bytes_ax.get_xticklabels()]
    assert set(scopes) == {e.scope for e in trace.events} == {"attn", "mlp"}
    heights = bar_heights(bytes_ax)
    for label, hs in heights.items():
        op, phase = label.split(" (")
        for scope, h in zip(scopes, hs):
            assert h == pytest.approx(trace.total(op=op, phase=phase.rstrip(")"), scope=scope) / p)
    assert sum(hs.sum() for hs in heights.values()) == pytest.approx(trace.total() / p)
    est = cost.estimate(trace, TOY)
    assert sum(hs.sum() for hs in bar_heights(time_ax).values()) == pytest.approx(sum(est.per_rank().values()) / p)


def test_plot_comm_of_several_traces_has_one_bar_per_label():
    cfg = Config(world_size=2, seq=16, hidden=8, heads=2, dtype=torch.float32, device="cpu")
    points = {m: measure(m, cfg, TOY) for m in ("tp", "ring", "ulysses")}
    fig = plot.plot_comm({m: pt.trace for m, pt in points.items()})
    render(fig)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(points)
    totals = sum(bar_heights(ax).values())
    assert totals == pytest.approx([pt.trace.total() / 2 for pt in points.values()])
    assert totals == pytest.approx([pt.sent for pt in points.values()])


def test_plot_scaling_lines_are_the_points():
    """Solid: one micro-batch's forward + backward; dotted: the gradient reduction, once per step (Ulysses
    all-reduces its replicated weights' gradients: one all-reduce of P values, priced by collective_time)."""
    points = [measure(m, Config(world_size=p, seq=16, hidden=8, heads=2, dtype=torch.float32, device="cpu"), TOY)
              for p in (1, 2) for m in ("tp", "ulysses")]
    fig = plot.plot_scaling(points, "world_size")
    render(fig)
    bytes_ax, time_ax = fig.axes[:2]
    lines = {line.get_label(): line for line in bytes_ax.get_lines()}
    assert sorted(lines) == ["tp", "ulysses", "ulysses gradients"]  # TP reduces nothing: no dotted line
    for method in ("tp", "ulysses"):
        mine = [pt for pt in points if pt.method == method]
        assert list(lines[method].get_xdata()) == [1, 2]
        assert list(lines[method].get_ydata()) == pytest.approx(
            [(pt.trace.total(phase="forward") + pt.trace.total(phase="backward")) / pt.world_size for pt in mine])
    ulysses = [pt for pt in points if pt.method == "ulysses"]
    params = 12 * 8 * 8 + 13 * 8  # TransformerBlock(8, 2): 12h² + 13h, float32
    assert list(lines["ulysses gradients"].get_ydata()) == pytest.approx([0.0, 2 * (2 - 1) / 2 * params * 4])
    times = {line.get_label(): line for line in time_ax.get_lines()}
    assert list(times["ulysses gradients"].get_ydata()) == pytest.approx(
        [0.0, cost.collective_time("all_reduce", params * 4, 2, TOY)], rel=1e-12)
    for method in ("tp", "ulysses"):
        mine = [pt for pt in points if pt.method == method]
        grads = times[f"{method} gradients"].get_ydata() if method == "ulysses" else [0.0, 0.0]
        whole = [max(pt.timeline.comm(r) for r in range(pt.world_size)) for pt in mine]
        # every call blocks and the reduction comes last: micro-batch time + step's reduction = the whole timeline
        assert [a + b for a, b in zip(times[method].get_ydata(), grads)] == pytest.approx(whole, rel=1e-12)
        assert list(times[f"{method} exposed"].get_ydata()) == pytest.approx(list(times[method].get_ydata()))
    assert [lines[m].get_ydata()[0] for m in ("tp", "ulysses")] == [0, 0]  # one rank sends nothing


def test_plot_timeline_draws_every_span_of_a_ring_attention_run():
    p, n = 3, 32
    q, k, v = (torch.randn(1, 2, n * p, 8) for _ in range(3))

    def fn(comm):
        shards = [ts.shard_sequence(x, comm.rank, p, dim=2).requires_grad_() for x in (q, k, v)]
        ts.ring_attention(*shards, comm, causal=True).sum().backward()

    tl = timeline(ts.run(fn, world_size=p, count_flops=True).trace, TOY)
    fig = plot.plot_timeline(tl)
    render(fig)
    bars = fig.axes[0].collections
    assert len(bars) == len(tl.spans)
    compute_color = matplotlib.colors.to_rgba("tab:blue")
    widths = sum(w for bar in bars if tuple(bar.get_facecolor()[0]) == compute_color
                 for _, w in [path.get_extents().bounds[::2] for path in bar.get_paths()])
    assert widths == pytest.approx(sum(tl.compute(r) for r in range(p)), rel=1e-6)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert all(f"rank {r}" in label for r, label in enumerate(labels))


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_plot_shards_shows_who_holds_what_and_zigzag_balances_causal_pairs(p):
    s = 8 * p
    fig = plot.plot_shards(s, p)
    render(fig)
    images = [np.ma.filled(ax.images[0].get_array().astype(float), np.nan) for ax in fig.axes]  # imshow masks NaNs
    held_contig, pairs_contig, held_zigzag, pairs_zigzag = images
    hand = {  # contiguous: tokens 8r .. 8r+7; zigzag: chunks r and 2p-1-r of 2p chunks of 4
        "contiguous": lambda r: list(range(8 * r, 8 * r + 8)),
        "zigzag": lambda r: list(range(4 * r, 4 * r + 4)) + list(range(4 * (2 * p - 1 - r), 4 * (2 * p - r))),
    }
    for layout, held in (("contiguous", held_contig), ("zigzag", held_zigzag)):
        for r in range(p):
            assert sorted(np.flatnonzero(held[r] == r).tolist()) == hand[layout](r)
        assert np.isnan(held).sum() == (p - 1) * s  # each token on exactly one rank
    counts = {layout: [int((pairs == r).sum()) for r in range(p)]
              for layout, pairs in (("contiguous", pairs_contig), ("zigzag", pairs_zigzag))}
    chunk = s // p
    assert counts["contiguous"] == [sum(i + 1 for i in range(r * chunk, (r + 1) * chunk)) for r in range(p)]
    assert counts["zigzag"] == [s * (s + 1) // 2 // p] * p
    assert str(counts["zigzag"]) in fig.axes[3].get_title()


def test_plot_token_owners_colours_each_position_by_its_rank():
    """Issue 22 §2: notebook 07's token tables as a picture; the grid is the positions each rank holds."""
    tokens = {"contiguous": [[0, 1, 2], [3, 4, 5]], "zigzag": [[0, 5], [1, 4], [2, 3]]}
    fig = plot.plot_token_owners(tokens)
    render(fig)
    ax = fig.axes[0]
    assert ax.images[0].get_array().tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 2, 2, 1, 0]]
    assert [t.get_text() for t in ax.texts][:6] == ["r0", "r0", "r0", "r1", "r1", "r1"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["contiguous", "zigzag"]
    with pytest.raises(ValueError, match="zigzag: token 1 is held by rank 0 and rank 1"):
        plot.plot_token_owners({"zigzag": [[0, 1], [1, 2]]})
