"""Helpers shared by the tests (a plain module: ``conftest`` is a name pytest gives every folder's fixtures)."""

from __future__ import annotations

import os

import torch

import tpsp_sim as ts


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


def child_processes() -> set[int]:
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
