"""nbval compares a notebook's text outputs with a fresh run but skips images, so a stale plot would
never fail CI. This plugin adds the figures: each cell nbval checks must store as many PNGs as the
fresh run makes, of the same pixel size, with the same picture — at most ``MAX_CHANGED`` of the
pixels may differ by more than ``BIG`` (0..1 scale), which tolerates anti-aliasing differences
between matplotlib builds but not a moved bar, line or label."""

from __future__ import annotations

import base64
import io

import numpy as np

BIG = 0.25  # a change this large in any channel is a different picture, not anti-aliasing
MAX_CHANGED = 0.002  # fraction of pixels


def png_pixels(b64: str) -> np.ndarray:
    from matplotlib.image import imread

    return imread(io.BytesIO(base64.b64decode(b64)), format="png")


def pngs(outputs) -> list[str]:
    return [out["data"]["image/png"] for out in outputs if "image/png" in out.get("data", {})]


def figure_problems(fresh, stored) -> list[str]:
    """Why the stored figures of a cell are not those of the fresh run (an empty list if they are)."""
    new, old = pngs(fresh), pngs(stored)
    if len(new) != len(old):
        return [f"the fresh run draws {len(new)} figure(s), the notebook stores {len(old)}: re-run it "
                f"(python tools/run_notebooks.py)"]
    problems = []
    for i, (a, b) in enumerate(zip(new, old)):
        a, b = png_pixels(a), png_pixels(b)
        if a.shape != b.shape:
            problems.append(f"figure {i}: {a.shape[1]}x{a.shape[0]} px fresh, {b.shape[1]}x{b.shape[0]} px stored")
            continue
        changed = float((np.abs(a.astype(float) - b.astype(float)).max(-1) > BIG).mean())
        if changed > MAX_CHANGED:
            problems.append(f"figure {i}: {changed:.2%} of its pixels differ from the fresh run's (limit "
                            f"{MAX_CHANGED:.1%}): the stored figure is stale, re-run the notebook")
    return problems


def _install() -> None:
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:  # nbval not installed: nothing to extend
        return
    compare_text = IPyNbCell.compare_outputs

    def compare_outputs(self, test, ref, skip_compare=None):
        same = compare_text(self, test, ref, skip_compare)
        problems = figure_problems(test, ref)
        if problems:
            self.comparison_traceback = list(getattr(self, "comparison_traceback", [])) + problems
        return same and not problems

    IPyNbCell.compare_outputs = compare_outputs


_install()
