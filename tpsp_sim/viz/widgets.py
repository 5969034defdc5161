"""An ipywidgets dashboard: pick the sizes and the hardware, see each parallelism's communication.

``update(...)`` does the work and is a plain function (tests call it directly, and a notebook shows
its default view as a stored figure for readers without a kernel); ``dashboard()`` wires it to
controls (it needs ipywidgets: ``pip install -e .[notebooks]``). Every choice the controls offer
gives a view: world sizes and sequence lengths are powers of two, so the sequence always divides
(ring and all-gather attention always run); a method whose sizes do not divide (heads on too many ranks) is
listed with the reason. Sliders act on release (``continuous_update=False``) and the status line
says "computing…" while the simulator runs the block. ``stepper`` plays a sequence of figures (the
step-by-step pictures of ``viz.steps``) with a Play button and a slider.
"""

from __future__ import annotations

import html
import io
import time
from typing import Any, Callable

from matplotlib.figure import Figure

from ..analysis import cost
from ..analysis.sweep import Config, Point, sweep, table
from .plot import plot_comm

DEFAULTS: dict[str, Any] = {"world_size": 4, "seq": 4096, "batch": 1, "hidden": 1024, "heads": 16,
                            "hardware": "h100-nvlink"}
CHOICES: dict[str, tuple[int, ...]] = {
    "world_size": (2, 4, 8, 16),
    "seq": tuple(2 ** k for k in range(8, 18)),  # 256 ... 128K: divisible by 2p for every p above (zigzag)
    "batch": (1, 2, 4, 8),
    "hidden": tuple(2 ** k for k in range(7, 14)),  # 128 ... 8192: divisible by every head count below
    "heads": (4, 8, 16, 32, 64),
}
DPI = 80  # the PNG is shown at its own pixel size: 80 px per inch of the figure
# A notebook's HTML output pads table cells; an ipywidgets.HTML (the live dashboard) does not: "4 4096" ran together.
TABLE_STYLE = "<style>.tpsp-dashboard td, .tpsp-dashboard th {padding: 2px 10px; border-bottom: 1px solid #ddd}</style>"


def update(world_size: int = 4, seq: int = 4096, batch: int = 1, hidden: int = 1024, heads: int = 16,
           hardware: str = "h100-nvlink", device: str = "meta") -> tuple[Figure, str, list[Point]]:
    """Run one block of every method that can run these sizes on ``hardware`` (a preset key); return (the figure:
    bytes sent per rank and predicted time per rank, the HTML table with the skipped methods and why,
    the points). With no method able to run, the figure says so in words."""
    cfg = Config(world_size=world_size, seq=seq, batch=batch, hidden=hidden, heads=heads, device=device)
    points, skipped = sweep(cfg, hardware)
    title = (f"one block on {world_size} ranks: {batch}×{seq} tokens, hidden {hidden}, {heads} heads, on "
             f"{cost.cluster(hardware).name}\none micro-batch, and (dotted) the gradient reduction paid once per step")
    if points:
        fig = plot_comm({p.method: p.trace for p in points}, hardware, title=title, totals=True)
    else:
        fig = Figure(figsize=(8.8, 2))
        fig.text(0.5, 0.5, "no method can run these sizes — see the reasons below", ha="center", va="center")
    notes = "".join(f"<li>skipped {html.escape(why)}</li>" for why in skipped)
    return fig, TABLE_STYLE + table(points, hardware, "html") + (f"<ul>{notes}</ul>" if notes else ""), points


def png(fig: Figure) -> tuple[bytes, int, int]:
    """The figure as PNG bytes, with its width and height in pixels."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    width, height = (round(v * DPI) for v in fig.get_size_inches())
    return buffer.getvalue(), width, height


def dashboard(**defaults: Any):
    """Controls for world size, sequence length, batch, hidden size, heads and hardware, above the
    figure and table of ``update``; ``defaults`` overrides ``DEFAULTS`` (and may set ``device``)."""
    import ipywidgets as w

    start = {**DEFAULTS, **defaults}
    device = start.pop("device", "meta")
    labels = {"world_size": "ranks", "seq": "seq", "batch": "batch", "hidden": "hidden", "heads": "heads"}
    controls: dict[str, Any] = {
        name: w.SelectionSlider(options=sorted({*CHOICES[name], start[name]}), value=start[name], description=label,
                                continuous_update=False)
        for name, label in labels.items()}
    controls["hardware"] = w.Dropdown(options=list(cost.PRESETS), value=start["hardware"], description="hardware")
    status = w.HTML()
    image = w.Image(format="png", layout=w.Layout(max_width="100%", height="auto"))
    text = w.HTML()
    text.add_class("tpsp-dashboard")

    def redraw(change: Any = None) -> None:
        status.value = "<i>computing… (the simulator runs the block)</i>"
        began = time.perf_counter()
        values = {name: c.value for name, c in controls.items()}
        fig, table_html, points = update(**values, device=device)
        image.value, width, height = png(fig)
        image.width, image.height = str(width), str(height)
        text.value = table_html
        status.value = f"{len(points)} method(s) in {time.perf_counter() - began:.1f} s"

    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    box = w.VBox([w.HBox(list(controls.values())[:3]), w.HBox(list(controls.values())[3:]), status, image, text])
    box.controls = controls  # for scripts and tests: box.controls["seq"].value = 8192 redraws
    box.image, box.table, box.status = image, text, status
    return box


def stepper(draw: Callable[[int], Figure], steps: int, description: str = "step"):
    """A Play button linked to a slider over ``steps`` frames; frame i is the figure ``draw(i)``, drawn
    once and kept (e.g. ``stepper(lambda i: steps.plot_ring_all_reduce(4, step=i), 7)``)."""
    import ipywidgets as w

    play = w.Play(min=0, max=steps - 1, interval=1500, description="play")
    slider = w.IntSlider(min=0, max=steps - 1, description=description)
    w.jslink((play, "value"), (slider, "value"))
    image = w.Image(format="png", layout=w.Layout(max_width="100%", height="auto"))
    frames: dict[int, tuple[bytes, int, int]] = {}

    def show(change: Any = None) -> None:
        if slider.value not in frames:
            frames[slider.value] = png(draw(slider.value))
        image.value, width, height = frames[slider.value]
        image.width, image.height = str(width), str(height)

    slider.observe(show, names="value")
    show()
    box = w.VBox([w.HBox([play, slider]), image])
    box.slider, box.image = slider, image
    return box
