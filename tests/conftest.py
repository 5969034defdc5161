"""Shared test fixtures and helpers (``from conftest import seeded_randn``)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

import tpsp_sim as ts

GRACE = 3.0  # seconds a test's threads and child processes get to end after it


def _ours(thread: threading.Thread) -> bool:
    """A thread running this project's code (a virtual rank, or a thread a test started)."""
    target = getattr(thread, "_target", None)  # deleted once the target has returned
    module = getattr(target, "__module__", None) or ""
    return (thread.name.startswith("tpsp_sim") or module.split(".")[0] in ("tpsp_sim", "tests", "conftest")
            or module.startswith("test_"))


def _children() -> set[int]:
    """Live (not zombie) child processes of this process, from /proc (Linux; elsewhere none are checked)."""
    me, found = os.getpid(), set()
    if not os.path.isdir("/proc"):
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                _, rest = f.read().rsplit(")", 1)  # the command name may hold spaces and parentheses
        except OSError:  # ended meanwhile
            continue
        state, ppid = rest.split()[:2]
        if int(ppid) == me and state != "Z":
            found.add(int(entry))
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


def seeded_randn(*shapes: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Normal tensors of ``shapes``, drawn one after another from one generator seeded with ``seed``
    (e.g. an input and its upstream gradient); the global generator is left alone."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for shape in shapes]


def local(x: torch.Tensor, comm, mode: str) -> torch.Tensor:
    """This rank's input of a parallel block: its sequence shard (dim 1) under "tp_sp", the whole tensor under "tp"."""
    return ts.shard_sequence(x, comm.rank, comm.world_size, dim=1) if mode == "tp_sp" else x.clone()


def run_block_stack(build, x: torch.Tensor, gy: torch.Tensor, t: int, mode: str, *, positions=None,
                    gather: bool = True) -> tuple:
    """Run the stack of parallel blocks ``build(comm)`` on ``t`` virtual ranks under scopes block0, block1, ...:
    forward ``x``, backward ``gy`` (each rank its ``local`` piece), sequence-parallel gradients synced.

    Returns (y, dx, dense gradients per rank and block or None without ``gather``, trace), y and dx whole
    (joined over the sequence under "tp_sp"; under "tp" every rank's output is checked equal first)."""
    def fn(comm):
        stack = build(comm)
        xi = local(x, comm, mode).requires_grad_()
        y = xi
        for i, block in enumerate(stack):
            with comm.scope(f"block{i}"):
                y = block(y, positions)
        y.backward(local(gy, comm, mode))
        if not gather:
            return y.detach(), xi.grad, None
        for block in stack:
            if mode == "tp_sp":
                ts.sync_sequence_parallel_grads(block, comm)
        return y.detach(), xi.grad, [ts.gather_dense_grads(block) for block in stack]

    res = ts.run(fn, world_size=t)
    if mode == "tp":
        assert all(torch.equal(out[0], res.outputs[0][0]) for out in res.outputs), "tp: every rank holds the same output"
    join = (lambda xs: torch.cat(xs, 1)) if mode == "tp_sp" else (lambda xs: xs[0])
    return (join([o[0] for o in res.outputs]), join([o[1] for o in res.outputs]),
            [o[2] for o in res.outputs], res.trace)
