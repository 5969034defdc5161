"""Real runs of ``ts.run`` (``backend="gloo"`` or ``"nccl"``): one fresh Python process per rank.

``run_processes`` starts them on loopback around a TCPStore held by the caller. ``fn`` and its arguments travel by cloudpickle, so a function defined in a notebook
cell works too; outputs and traces come back through files. Under ``torchrun`` the same per-rank
code runs with ``torchrun ... -m tpsp_sim.dist.worker MODULE:FN`` (see worker.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import cloudpickle
import torch
import torch.distributed as dist

from ..core.errors import SimulationError, rank_failed
from ..core.result import RunResult
from ..core.trace import CommTrace


def run_processes(fn: Callable, args: tuple, kwargs: dict, world_size: int, backend: str,
                  timeout: float) -> RunResult:
    """Run ``fn`` on ``world_size`` new processes of ``backend``; raise the first rank's own failure."""
    try:
        payload = cloudpickle.dumps((fn, args, kwargs))
    except Exception as error:
        raise TypeError(f"ts.run(backend={backend!r}) could not serialize fn={fn!r} or its arguments to send them "
                        f"to the worker processes ({error}). Define fn at module level in an importable file, "
                        f"or in a notebook cell, and pass plain tensors and numbers.") from error
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    with tempfile.TemporaryDirectory(prefix="tpsp_sim-") as tmp:
        work = Path(tmp)
        (work / "payload.pkl").write_bytes(payload)
        (work / "sys_path.json").write_text(json.dumps(sys.path))  # where fn's module is found
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        procs = []
        for rank in range(world_size):
            cmd = [sys.executable, "-m", "tpsp_sim.dist.worker", "--worker", str(work), "--rank", str(rank),
                   "--world-size", str(world_size), "--backend", backend, "--port", str(store.port),
                   "--timeout", str(timeout)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=open(work / f"stdout{rank}", "wb"),
                                          stderr=open(work / f"stderr{rank}", "wb")))
        try:
            _wait_for(procs, work, timeout)
        except KeyboardInterrupt:
            _kill(procs)
            raise
        results = [_read_result(work, rank, procs[rank]) for rank in range(world_size)]
        failed_at = [_failure_time(work, rank) for rank in range(world_size)]
        for rank in range(world_size):
            text = (work / f"stdout{rank}").read_text(errors="replace")
            for line in text.splitlines():
                print(f"[rank {rank}] {line}")
    failures = [(rank, r) for rank, r in enumerate(results) if r[0] != "ok"]
    if failures:
        # a rank's own error, before ranks killed after it; the earliest first, since the peers of a rank
        # that failed and exited fail after it with errors of their own ("Connection closed by peer")
        own = sorted((f for f in failures if f[1][0] == "error"), key=lambda f: failed_at[f[0]])
        rank, (_, cause) = (own or failures)[0]
        raise rank_failed(rank, cause) from cause
    outputs = [r[1] for r in results]
    return RunResult(outputs, CommTrace.from_recorders([r[2] for r in results]))


def _wait_for(procs: list[subprocess.Popen], work: Path, timeout: float) -> None:
    """Wait for every worker; once one has failed, give the others two seconds, then kill them."""
    deadline = time.monotonic() + timeout + 30  # workers enforce `timeout` on their collectives
    failed_at = None
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs) or any((work / f"failed{r}").exists() for r in range(len(procs))):
            failed_at = failed_at or time.monotonic()
        if (failed_at and time.monotonic() - failed_at > 2.0) or time.monotonic() > deadline:
            _kill(procs)
            return
        time.sleep(0.02)


def _failure_time(work: Path, rank: int) -> float:
    """When ``rank``'s worker reported a failure (its marker holds ``time.time_ns()``); inf if it did not."""
    try:
        return int((work / f"failed{rank}").read_text())
    except (FileNotFoundError, ValueError):
        return math.inf


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def _read_result(work: Path, rank: int, proc: subprocess.Popen) -> tuple:
    path = work / f"result{rank}.pkl"
    if path.exists():
        return cloudpickle.loads(path.read_bytes())
    err = (work / f"stderr{rank}").read_text(errors="replace")[-3000:]
    reason = "was stopped after another rank failed" if proc.returncode in (-9, 137) else \
        f"exited with code {proc.returncode} without a result"
    return ("released", SimulationError(f"worker process of rank {rank} {reason}; its stderr ends:\n{err}"))
