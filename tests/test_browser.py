"""Notebook 04 in a real JupyterLab, driven in headless Chromium by Playwright.

Starts JupyterLab on a loopback port with a token, on a copy of the notebook in a temporary folder
(Run All and autosave never touch the repository), opens it, runs every cell, and asserts no error
output, no widget error on the page or in the console; then changes each dashboard control once and
asserts the figure changes. Screenshots go to the temporary folder (printed with ``-s``).

Needs Debian's ``chromium`` (``apt-get install chromium``; no browser download) and ``pip install
playwright``. Without them the test is skipped, and says so — except under CI (``CI=true``), where
a skip would hide a broken dashboard, so it fails.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "04_communication_costs.ipynb"
CHROMIUM = "/usr/bin/chromium"
CONTROLS = ("ranks", "seq", "batch", "hidden", "heads")  # the sliders' descriptions, then the hardware dropdown

pytestmark = pytest.mark.browser


def unavailable() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not found (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    return None


def require_browser() -> None:
    why = unavailable()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"the browser test cannot run under CI: {why}")
    pytest.skip(f"BROWSER TEST SKIPPED: {why}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 serving a copy of notebook 04; yields (url, folder)."""
    require_browser()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, tmp_path / NOTEBOOK)
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    port, token = free_port(), secrets.token_hex(16)
    bin_dir = Path(sys.executable).parent  # the kernel ("python3") must run this environment's python
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    cmd = [str(bin_dir / "jupyter-lab"), "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}",
           f"--LabApp.user_settings_dir={tmp_path / 'settings'}", f"--LabApp.workspaces_dir={tmp_path / 'ws'}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    with open(tmp_path / "lab.log", "w") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}?token={token}", tmp_path
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the kernels it started
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(5)


PROMPTS = "[...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent)"
QUEUED = f"() => {PROMPTS}.some(p => p.includes('*'))"
FINISHED = f"() => !{PROMPTS}.some(p => p.includes('*'))"  # Run All stops at an error: none left queued


def kernel_idle(page) -> None:
    """Wait for the notebook's kernel to be up and idle (answering JupyterLab's kernel dialog if it asks)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        dialog = page.locator(".jp-Dialog button.jp-mod-accept")
        if dialog.count():
            dialog.first.click()
        if page.locator(".jp-StatusBar-TextItem", has_text="| Idle").count():
            return
        time.sleep(0.25)
    raise AssertionError("the kernel did not become idle within 60 s")


def image_src(page) -> str:
    return page.locator(".widget-image img, img.widget-image").first.get_attribute("src") or ""


def run_all(page, url: str, finish_ms: int) -> None:
    """Open the notebook at ``url`` (retrying while the server starts), Run All, wait for every cell, and
    fail on any error output."""
    for _ in range(120):  # the server takes a few seconds to listen
        try:
            page.goto(url)
            break
        except Exception:  # noqa: BLE001 - connection refused until it is up
            time.sleep(0.5)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    kernel_idle(page)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.locator("li[data-command='runmenu:run-all']").click()
    page.wait_for_function(QUEUED, timeout=10_000)
    page.wait_for_function(FINISHED, timeout=finish_ms)
    errors = [e.text_content() for e in page.locator("[data-mime-type='application/vnd.jupyter.stderr']").all()]
    assert not errors, f"error output after Run All:\n{errors[0][-2000:]}"


def test_notebook_04_runs_in_jupyterlab_and_the_dashboard_responds(lab):
    from playwright.sync_api import sync_playwright

    url, folder = lab
    began = time.perf_counter()
    console: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
        run_all(page, url, finish_ms=120_000)
        prompts = [e.text_content() for e in page.locator(".jp-CodeCell .jp-InputPrompt").all()]  # off-screen too
        assert [p.strip() for p in prompts] == [f"[{n}]:" for n in range(1, len(prompts) + 1)], prompts
        page.screenshot(path=folder / "after_run_all.png")

        dashboard = page.locator(".widget-vbox").last
        dashboard.scroll_into_view_if_needed()
        page.wait_for_function("() => !!document.querySelector('.widget-image img, img.widget-image')", timeout=30_000)
        page.screenshot(path=folder / "dashboard.png")
        for name in CONTROLS + ("hardware",):
            before = image_src(page)
            if name == "hardware":
                select = dashboard.locator(".widget-dropdown select")
                options = select.locator("option").all_inner_texts()
                select.select_option(label=options[(options.index(select.input_value()) + 1) % len(options)]
                                     if select.input_value() in options else options[1])
            else:
                handle = dashboard.locator(".widget-slider", has_text=name).locator(".noUi-handle")
                handle.focus()
                handle.press("ArrowLeft" if name in ("ranks", "seq", "hidden") else "ArrowRight")  # cheaper views
            page.wait_for_function("(before) => { const img = document.querySelector('.widget-image img, "
                                   "img.widget-image'); return img && img.src !== before; }", arg=before,
                                   timeout=60_000)
            page.screenshot(path=folder / f"after_{name}.png")
        text = page.locator(".jp-Notebook").inner_text()
        browser.close()
    assert "Error displaying widget" not in text and "model not found" not in text
    assert not console, "errors in the browser console:\n" + "\n".join(console)
    print(f"browser test: {time.perf_counter() - began:.0f} s; screenshots in {folder}")
