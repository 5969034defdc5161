"""The dashboard: ``update`` is a plain function whose figure and table follow its arguments and add
up to the traces; every choice the controls offer gives a view; the widget redraws on each control,
shows the PNG at its own size, and acts on release. Byte axes tick at round binary values."""

from __future__ import annotations

import struct

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

from tpsp_sim.viz.plot import byte_axis
from tpsp_sim.viz.widgets import CHOICES, DEFAULTS, dashboard, png, update

matplotlib.use("Agg")

SMALL = {"seq": 16, "batch": 1, "hidden": 16, "heads": 4, "hardware": "a100-nvlink", "device": "cpu"}


def bar_totals(ax) -> np.ndarray:
    return sum(np.array([bar.get_height() for bar in c]) for c in ax.containers)


def test_update_draws_bytes_and_time_per_method_and_matches_the_traces():
    fig2, html2, points2 = update(world_size=2, **SMALL)
    fig4, html4, points4 = update(world_size=4, **SMALL)
    assert [p.method for p in points2] == [p.method for p in points4] == ["tp", "tp_sp", "ring", "ulysses", "allgather"]
    for fig, points in ((fig2, points2), (fig4, points4)):
        assert len(fig.axes) == 2  # bytes, then time
        assert bar_totals(fig.axes[0]) == pytest.approx([p.trace.total() / p.world_size for p in points])
        labels = fig.axes[0].get_legend_handles_labels()[1]
        assert labels and not any(label.startswith("recv") for label in labels)  # receives send nothing
    assert not np.allclose(bar_totals(fig2.axes[0]), bar_totals(fig4.axes[0]))
    assert "<table" in html2 and "<pre" not in html2 and html2 != html4


def test_the_hardware_changes_the_time_panel_only():
    nvlink, html_nvlink, _ = update(world_size=2, **SMALL)
    pcie, html_pcie, _ = update(world_size=2, **{**SMALL, "hardware": "pcie-gen4"})
    assert bar_totals(nvlink.axes[0]) == pytest.approx(bar_totals(pcie.axes[0]))
    assert (bar_totals(pcie.axes[1]) > bar_totals(nvlink.axes[1])).all()  # 31.5 GB/s against 300 GB/s
    assert html_nvlink != html_pcie and "PCIe" in html_pcie


def test_every_choice_divides_so_ring_attention_always_runs():
    for p in CHOICES["world_size"]:
        assert all(seq % (2 * p) == 0 for seq in CHOICES["seq"])  # zigzag: 2p chunks
    assert all(h % a == 0 for h in CHOICES["hidden"] for a in CHOICES["heads"])
    assert all(DEFAULTS[name] in options for name, options in CHOICES.items())


def test_methods_that_cannot_run_are_listed_with_the_reason():
    fig, html, points = update(world_size=16, seq=256, batch=1, hidden=128, heads=4)
    assert [p.method for p in points] == ["ring", "allgather"]  # they cut the sequence, not the heads
    assert bar_totals(fig.axes[0]).all()
    for method in ("tp", "tp_sp", "ulysses"):
        assert f"<li>skipped {method} on 16 ranks, seq 256" in html
    assert "not divisible" in html


def test_no_method_at_all_is_said_in_words():
    fig, html, points = update(world_size=3, seq=16, hidden=16, heads=4, device="meta")
    assert points == [] and "no method can run these sizes" in fig.texts[0].get_text()
    assert html.count("<li>skipped") == 5  # every method


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_the_png_is_shown_at_its_own_size():
    fig, _, _ = update(world_size=2, **SMALL)
    data, width, height = png(fig)
    assert png_size(data) == (width, height)


@pytest.mark.slow
def test_dashboard_redraws_on_every_control_and_acts_on_release():
    pytest.importorskip("ipywidgets")
    box = dashboard(world_size=2, **SMALL)
    assert png_size(box.image.value) == (int(box.image.width), int(box.image.height))
    assert "<table" in box.table.value and "method(s) in" in box.status.value
    for name, control in box.controls.items():
        if name != "hardware":
            assert control.continuous_update is False
        before = box.image.value
        options = list(control.options)
        values = [v for _, v in options] if isinstance(options[0], tuple) else options
        control.value = values[(values.index(control.value) + 1) % len(values)]
        assert box.image.value != before, f"changing {name} did not change the figure"


def ticks(vmax: float, scale: str = "linear") -> list[str]:
    fig = Figure()
    ax = fig.subplots()
    ax.set_yscale(scale)
    ax.set_ylim(1 if scale == "log" else 0, vmax)
    byte_axis(ax.yaxis)
    fig.canvas.draw()
    low, high = ax.get_ylim()
    return [t.get_text() for t, at in zip(ax.get_yticklabels(), ax.get_yticks()) if low <= at <= high]


def test_byte_ticks_are_round_binary_values():
    # 30 MB = 28.6 MiB: ticks at multiples of 5 MiB, not 9.5, 19.1, 28.6 MiB
    assert ticks(30e6) == ["0 B", "5 MiB", "10 MiB", "15 MiB", "20 MiB", "25 MiB"]
    assert ticks(3.3 * 2**20) == ["0 B", "1 MiB", "2 MiB", "3 MiB"]  # never 0.8, 1.6, 2.4 MiB
    assert ticks(1.0) == ["0 B", "1 B"]  # never "1 B, 1 B, 0 B" for fractions of a byte
    assert ticks(3 * 1024) == ["0 B", "0.5 KiB", "1 KiB", "1.5 KiB", "2 KiB", "2.5 KiB", "3 KiB"]
    log = ticks(2.0 ** 32, "log")
    assert "1 KiB" in log and "1 MiB" in log and "1 GiB" in log and all("." not in t for t in log)


def test_every_panel_has_headroom_above_its_tallest_bar_and_writes_each_total():
    """Issue 22 §4: the time panel's limit was the tallest bar (zero-height stacked segments
    pinned it); every bar now has its total written above it, so a thin one (sp_grads) still reads."""
    fig, _, points = update(world_size=2, **SMALL)  # the time panel was pinned on every size, 16 ranks where seen
    for ax in fig.axes:
        tallest = bar_totals(ax).max()
        assert ax.get_ylim()[1] >= 1.1 * tallest
        assert len(ax.texts) == len(points)
