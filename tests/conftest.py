"""Fixtures every test gets (shared helpers live in helpers.py: ``from helpers import seeded_randn``)."""

from __future__ import annotations

import os
import threading
import time

import pytest

GRACE = 3.0  # seconds a test's threads and child processes get to end after it


def _ours(thread: threading.Thread) -> bool:
    """A thread running this project's code (a virtual rank, or a thread a test started)."""
    target = getattr(thread, "_target", None)  # deleted once the target has returned
    module = getattr(target, "__module__", None) or ""
    return (thread.name.startswith("tpsp_sim") or module.split(".")[0] in ("tpsp_sim", "tests", "conftest")
            or module.startswith("test_"))


def _children() -> set[int]:
    """Live (not zombie) child processes of this process, from /proc (Linux; elsewhere none are checked),
    and the processes that a gloo worker of ``ts.run`` started, even once orphaned: they carry this
    process's pid in ``TPSP_SIM_RUN_OWNER`` (set for every worker, tpsp_sim/dist/processes.py, and
    inherited). Only processes started after this one have their environment read (cheap)."""
    me, found = os.getpid(), set()
    if not os.path.isdir("/proc"):
        return found
    marker = f"\0TPSP_SIM_RUN_OWNER={me}\0".encode()

    def stat(pid: str) -> list[str]:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses

    my_start = int(stat("self")[19])  # field 22, starttime, in clock ticks since boot
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = stat(entry)
            state, ppid, start = fields[0], int(fields[1]), int(fields[19])
            if state == "Z":
                continue
            if ppid == me:
                found.add(int(entry))
            elif start >= my_start and int(entry) != me:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in b"\0" + f.read():
                        found.add(int(entry))
        except (OSError, IndexError, ValueError):  # ended meanwhile, or not ours to read
            continue
    return found


def _leftovers(threads_before: set[int], children_before: set[int]) -> tuple[list[str], set[int]]:
    # threading.enumerate(), not is_alive(): a signal during Thread.join can make is_alive() lie (CPython 3.11)
    threads = [f"{t.name} (target module {getattr(getattr(t, '_target', None), '__module__', '?')})"
               for t in threading.enumerate() if t.ident not in threads_before and _ours(t)]
    return threads, _children() - children_before


@pytest.fixture(autouse=True)
def nothing_outlives_a_test():
    """Fail a test that leaves behind a thread running this project's code, or a child process.

    Threads started by libraries for their own pools (asyncio, ZMQ, Jupyter) are not this project's
    and are left alone. Leftovers get GRACE seconds to end before the test fails.
    """
    threads_before = {t.ident for t in threading.enumerate()}
    children_before = _children()
    yield
    deadline = time.monotonic() + GRACE
    threads, children = _leftovers(threads_before, children_before)
    while (threads or children) and time.monotonic() < deadline:
        time.sleep(0.02)
        threads, children = _leftovers(threads_before, children_before)
    assert not threads and not children, (f"left behind after the test: threads {threads}, "
                                          f"child processes {sorted(children)}")
