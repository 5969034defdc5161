"""An ipywidgets dashboard: pick the sizes and the hardware, see each parallelism's communication.

``update(...)`` does the work and is a plain function (tests call it directly); ``dashboard()``
wires it to sliders and redraws whenever one moves (it needs ipywidgets: ``pip install -e .[notebooks]``).
"""

from __future__ import annotations

import html
import io
from typing import Any

from matplotlib.figure import Figure

from ..analysis.cost import PRESETS
from .plot import plot_comm
from ..analysis.sweep import Config, Point, sweep, table


def update(world_size: int = 4, seq: int = 4096, batch: int = 1, hidden: int = 1024, heads: int = 16,
           hardware: str = "h100-nvlink", device: str = "meta") -> tuple[Figure, str, list[Point]]:
    """Run one block of every method that can run these sizes; return (the bars of bytes sent per
    rank, a Markdown table with each method's bytes and predicted time on ``hardware``, the points)."""
    cfg = Config(world_size=world_size, seq=seq, batch=batch, hidden=hidden, heads=heads, device=device)
    points, skipped = sweep(cfg, hardware)
    fig = plot_comm({p.method: p.trace for p in points},
                    title=f"one block, {world_size} ranks, {batch}x{seq} tokens, hidden {hidden}, {heads} heads")
    return fig, "\n".join([table(points, hardware), *(f"- skipped {why}" for why in skipped)]), points


def dashboard(**defaults: Any):
    """Sliders for world size, sequence length, batch, hidden size, heads and hardware, above the
    figure and table of ``update``; ``defaults`` sets their starting values (and ``device``)."""
    import ipywidgets as w

    start = {"world_size": 4, "seq": 4096, "batch": 1, "hidden": 1024, "heads": 16, "hardware": "h100-nvlink",
             **defaults}
    device = start.pop("device", "meta")

    def slider(name: str, options: list[int], description: str):
        return w.SelectionSlider(options=sorted({*options, start[name]}), value=start[name], description=description)

    controls = {
        "world_size": slider("world_size", [1, 2, 3, 4, 6, 8, 16], "ranks"),
        "seq": slider("seq", [2 ** k for k in range(8, 18)], "seq"),
        "batch": slider("batch", [1, 2, 4, 8, 16], "batch"),
        "hidden": slider("hidden", [2 ** k for k in range(6, 14)], "hidden"),
        "heads": slider("heads", [1, 2, 4, 8, 16, 32, 64], "heads"),
        "hardware": w.Dropdown(options=list(PRESETS), value=start["hardware"], description="hardware"),
    }
    image, text = w.Image(format="png"), w.HTML()

    def redraw(change: Any = None) -> None:
        fig, markdown, _ = update(**{name: c.value for name, c in controls.items()}, device=device)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=90)
        image.value, text.value = png.getvalue(), f"<pre>{html.escape(markdown)}</pre>"

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    box = w.VBox([w.HBox(list(controls.values())[:3]), w.HBox(list(controls.values())[3:]), image, text])
    box.controls = controls  # for scripts and tests: box.controls["seq"].value = 8192 redraws
    return box
