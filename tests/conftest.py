"""Fixtures every test gets (shared helpers live in helpers.py: ``from helpers import seeded_randn``)."""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback

import pytest
from hypothesis import Phase, settings

from helpers import child_processes

# ---- Hypothesis: two profiles, chosen by the CI environment variable (HYPOTHESIS_PROFILE overrides) --
#
# Why these settings (measured on the 2-core machine, one planted byte-count bug in core/ops.py,
# tests/test_collectives.py's property test, empty example database):
# * Phase.explain is left out of both. After the first failure Hypothesis replays examples under
#   sys.settrace to say which lines only failing examples ran; with virtual-rank threads every traced
#   line of the runtime is slow, and the run went on for over 5 minutes (the issue saw 15) instead of
#   failing in 8 s. Nothing else bounded it: a pytest-timeout exception raised inside the test is
#   one more failing example to Hypothesis, which goes on searching.
# * "ci" leaves out shrinking too: a failure is reported with the first failing example found (not
#   the smallest) and its reproduce blob, at once. Hypothesis bounds a shrink only at 300 s, longer
#   than a test may take here. "dev" shrinks (a smaller example is worth a few seconds at your desk)
#   and keeps the example database in .hypothesis/ (ignored by git), so a failure is tried first
#   on the next run.
# * Both print the @reproduce_failure blob of a failure (the README's contributor section says how to
#   use it). Per-test max_examples stay in each test's own @settings.
_COMMON = dict(deadline=None, print_blob=True)
settings.register_profile("dev", phases=[p for p in Phase if p is not Phase.explain], **_COMMON)
settings.register_profile("ci", phases=[Phase.explicit, Phase.reuse, Phase.generate], database=None, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

GRACE = 3.0  # seconds a test's threads and child processes get to end after it


def _ours(thread: threading.Thread) -> bool:
    """A thread running this project's code (a virtual rank, or a thread a test started)."""
    target = getattr(thread, "_target", None)  # deleted once the target has returned
    module = getattr(target, "__module__", None) or ""
    return (thread.name.startswith("tpsp_sim") or module.split(".")[0] in ("tpsp_sim", "tests", "conftest")
            or module.startswith("test_"))


def _leftovers(threads_before: set[int], children_before: set[int]) -> tuple[list[str], set[int]]:
    # threading.enumerate(), not is_alive(): a signal during Thread.join can make is_alive() lie (CPython 3.11)
    threads = [f"{t.name} (target module {getattr(getattr(t, '_target', None), '__module__', '?')})"
               for t in threading.enumerate() if t.ident not in threads_before and _ours(t)]
    return threads, child_processes() - children_before


@pytest.fixture(autouse=True)
def nothing_outlives_a_test():
    """Fail a test that leaves behind a thread running this project's code, or a child process.

    Threads started by libraries for their own pools (asyncio, ZMQ, Jupyter) are not this project's
    and are left alone. Leftovers get GRACE seconds to end before the test fails.
    """
    threads_before = {t.ident for t in threading.enumerate()}
    children_before = child_processes()
    yield
    deadline = time.monotonic() + GRACE
    threads, children = _leftovers(threads_before, children_before)
    while (threads or children) and time.monotonic() < deadline:
        time.sleep(0.02)
        threads, children = _leftovers(threads_before, children_before)
    assert not threads and not children, (f"left behind after the test: threads {threads}, "
                                          f"child processes {sorted(children)}")


# ---- a hung test names itself -------------------------------------------------------------------
#
# Every test has a limit: pyproject's ``timeout``, or its own ``@pytest.mark.timeout(seconds)``. This
# replaces pytest-timeout's way of enforcing it (the hook is its documented extension point). Its
# "signal" method raises inside the test, which a Hypothesis test takes for one more failing example
# and searches on (15 minutes, in the issue that brought this in); its "thread" method prints to the
# worker's terminal, which pytest-xdist throws away, and does not say which test hung. Here a watch
# thread, at the limit, writes the test's id and the stack of every thread, named (virtual ranks are
# "tpsp_sim-rank<r>"), to the real stderr (under xdist the controller's terminal), then ends the
# process: nothing can catch it, and xdist reports the test as failed and goes on in a new worker.


def _dump_and_exit(item: pytest.Item, limit: float) -> None:
    capman = item.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.suspend_global_capture(in_=True)  # fd 2 is the terminal again
    names = {t.ident: t.name for t in threading.enumerate()}
    lines = [f"\n{'+' * 20} TIMEOUT: {item.nodeid} ran past its limit of {limit:g} s {'+' * 20}\n"]
    for ident, frame in sys._current_frames().items():
        if ident != threading.get_ident():
            lines.append(f"--- stack of thread {names.get(ident, '<unknown>')} ({ident}) ---\n")
            lines.extend(traceback.format_stack(frame))
    lines.append(f"{'+' * 20} TIMEOUT: {item.nodeid} (stacks above); ending the test process {'+' * 20}\n")
    try:
        sys.__stderr__.write("".join(lines))
        sys.__stderr__.flush()
    finally:
        os._exit(1)


def pytest_timeout_set_timer(item: pytest.Item, settings) -> bool:
    watch = threading.Timer(settings.timeout, _dump_and_exit, (item, settings.timeout))
    watch.daemon = True
    watch.name = f"timeout watch {item.nodeid}"

    def cancel() -> None:
        watch.cancel()
        watch.join()

    item.cancel_timeout = cancel  # pytest-timeout's own pytest_timeout_cancel_timer calls it
    watch.start()
    return True


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest files first: those that drive a browser, then the notebooks and the files that start
    processes (gloo, torchrun), then those marked slow, then the quick simulator tests, each file's tests
    (a notebook's cells) in their own order.
    ``make test`` hands whole files to two xdist workers (``--dist loadfile``) in this order, so the run does
    not end on one worker finishing a long file alone: 4 min 41 s, against 4 min 51 s in file order and
    5 min 6 s with the notebooks simply first (the whole suite, side by side, load 2-4)."""
    def rank(item: pytest.Item) -> int:
        if item.path.suffix == ".ipynb":
            return 1
        for position, marker in enumerate(("browser", "real", "slow")):
            if item.get_closest_marker(marker):
                return position
        return 3

    first: dict = {}
    for item in items:
        first[item.path] = min(first.get(item.path, 3), rank(item))
    items.sort(key=lambda item: first[item.path])  # stable: a file's tests, a notebook's cells, keep their order
