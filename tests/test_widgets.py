"""The dashboard's update is a plain function: its output follows the sliders, and adds up to the traces."""

import matplotlib
import numpy as np
import pytest

from tpsp_sim import cost
from tpsp_sim.viz.widgets import dashboard, update

matplotlib.use("Agg")

SMALL = {"seq": 16, "batch": 1, "hidden": 16, "heads": 4, "hardware": "a100-nvlink", "device": "cpu"}


def bar_totals(fig) -> np.ndarray:
    return sum(np.array([bar.get_height() for bar in c]) for c in fig.axes[0].containers)


def test_update_changes_with_world_size_and_matches_the_traces():
    fig2, text2, points2 = update(world_size=2, **SMALL)
    fig4, text4, points4 = update(world_size=4, **SMALL)
    assert [p.method for p in points2] == [p.method for p in points4] == ["tp", "tp_sp", "ring", "ulysses"]
    assert text2 != text4 and "| tp | 2 |" in text2 and "| tp | 4 |" in text4
    for fig, points in ((fig2, points2), (fig4, points4)):
        assert bar_totals(fig) == pytest.approx([p.trace.total() / p.world_size for p in points])
    assert not np.allclose(bar_totals(fig2), bar_totals(fig4))


def test_update_changes_with_hardware_and_reports_what_cannot_run():
    _, nvlink, _ = update(world_size=2, **SMALL)
    _, pcie, _ = update(world_size=2, **{**SMALL, "hardware": "pcie-gen4"})
    assert nvlink != pcie and cost.PCIE_GEN4.name in pcie
    _, text, points = update(world_size=3, **{**SMALL, "seq": 18, "heads": 4, "hidden": 16})
    assert [p.method for p in points] == ["ring"]  # 4 heads on 3 ranks: only ring attention runs
    assert "skipped tp on 3 ranks" in text and "n_heads=4 is not divisible" in text
    assert "skipped ulysses on 3 ranks, seq 18" in text


def test_dashboard_redraws_when_a_slider_moves():
    pytest.importorskip("ipywidgets")
    box = dashboard(world_size=2, **SMALL)
    image, text = box.children[2], box.children[3]
    before = (image.value, text.value)
    assert "| tp | 2 |" in text.value
    box.controls["world_size"].value = 4
    assert image.value != before[0] and text.value != before[1] and "| tp | 4 |" in text.value
