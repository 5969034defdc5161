"""The step-through players of notebooks 00 and 03 in a real JupyterLab (headless Chromium, Playwright).

Run All on a copy of each notebook; no error output; the player's frame is drawn at a readable size
(at least 500 px wide, shown at its own size, inside the output area: issue 22 §4) and a move of its
slider redraws it. Skipped without Chromium or Playwright, failed under CI: tests/test_browser.py's
``lab`` fixture, pointed at each notebook.
"""

from __future__ import annotations


import pytest

import test_browser
from test_browser import CHROMIUM, lab, run_all  # noqa: F401 - lab is a fixture

pytestmark = pytest.mark.browser
FRAME = "document.querySelector('.widget-image img, img.widget-image')"


@pytest.fixture
def notebook(request, monkeypatch):
    """The notebook ``lab`` serves (requested before it)."""
    monkeypatch.setattr(test_browser, "NOTEBOOK", request.param)
    return request.param


@pytest.mark.parametrize("notebook", ["00_collectives.ipynb", "03_ring_attention.ipynb"], indirect=True)
def test_the_player_runs_and_is_readable(notebook, lab):
    from playwright.sync_api import sync_playwright

    url, _ = lab
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        run_all(page, url, finish_ms=180_000)
        page.wait_for_function(f"() => !!{FRAME}", timeout=30_000)
        frame = page.locator(".widget-image img, img.widget-image").first
        frame.scroll_into_view_if_needed()
        natural_w, shown_w, area_w = frame.evaluate(
            "e => [e.naturalWidth, e.getBoundingClientRect().width,"
            " e.closest('.jp-OutputArea-output').getBoundingClientRect().width]")
        assert natural_w >= 500 and shown_w == natural_w and shown_w <= area_w, (natural_w, shown_w, area_w)
        before = frame.get_attribute("src")
        handle = page.locator(".widget-slider .noUi-handle").first
        handle.focus()
        handle.press("ArrowRight")
        page.wait_for_function(f"(before) => {FRAME}.src !== before", arg=before, timeout=60_000)
        browser.close()
