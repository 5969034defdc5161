"""``ts.run``: call a per-rank function on virtual ranks or on real ``torch.distributed`` processes.

Real runs (``backend="gloo"`` or ``"nccl"``) start ``world_size`` fresh Python processes on
loopback. ``fn`` and its arguments travel by cloudpickle, so a function defined in a notebook
cell works too; outputs and traces come back through files. Under ``torchrun`` the same per-rank
code runs with ``python -m tpsp_sim.launch MODULE:FN`` (see ``main``).
"""

from __future__ import annotations

import argparse
import importlib
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

from .errors import SimulationError
from .runtime import RunResult, rank_failed, run_virtual
from .trace import CommTrace, Recorder

BACKENDS = ("sim", "gloo", "nccl")


def run(fn: Callable[..., Any], *args: Any, world_size: int, backend: str = "sim",
        timeout: float | None = None, count_flops: bool = False, **kwargs: Any) -> RunResult:
    """Call ``fn(comm, *args, **kwargs)`` on every rank; return ``RunResult(outputs, trace)``.

    ``backend="sim"`` runs ``world_size`` virtual ranks as threads of this process (timeout
    default 600 s); ``"gloo"`` / ``"nccl"`` start real processes (timeout default 120 s; NCCL
    needs one GPU per rank, and tensor arguments are moved to each rank's GPU). ``count_flops``
    (simulator only) records the FLOPs each rank computes between communications, for
    ``ts.cost.timeline``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if backend == "sim":
        return run_virtual(fn, args, kwargs, world_size, timeout=600.0 if timeout is None else timeout,
                           count_flops=count_flops)
    if count_flops:
        raise ValueError("count_flops is available on the simulator only (backend='sim')")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend='nccl' needs one GPU per rank: world_size={world_size}, "
                         f"GPUs visible={torch.cuda.device_count()}")
    return _run_processes(fn, args, kwargs, world_size, backend, 120.0 if timeout is None else timeout)


# ---- real processes -----------------------------------------------------------------------------

def _run_processes(fn, args, kwargs, world_size, backend, timeout) -> RunResult:
    try:
        payload = cloudpickle.dumps((fn, args, kwargs, sys.path))
    except Exception as error:
        raise TypeError(f"ts.run(backend={backend!r}) could not serialize fn={fn!r} or its arguments to send them "
                        f"to the worker processes ({error}). Define fn at module level in an importable file, "
                        f"or in a notebook cell, and pass plain tensors and numbers.") from error
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    with tempfile.TemporaryDirectory(prefix="tpsp_sim-") as tmp:
        work = Path(tmp)
        (work / "payload.pkl").write_bytes(payload)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        procs = []
        for rank in range(world_size):
            cmd = [sys.executable, "-m", "tpsp_sim.launch", "--worker", str(work), "--rank", str(rank),
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
        for rank in range(world_size):
            text = (work / f"stdout{rank}").read_text(errors="replace")
            for line in text.splitlines():
                print(f"[rank {rank}] {line}")
    failures = [(rank, r) for rank, r in enumerate(results) if r[0] != "ok"]
    if failures:
        own = [f for f in failures if f[1][0] == "error"]  # a rank's own error, before ranks killed after it
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


# ---- inside one process -------------------------------------------------------------------------

def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _call_on_this_process(fn: Callable, args: tuple, kwargs: dict, backend: str) -> tuple[Any, Recorder]:
    """Run ``fn`` on this process's rank of the initialised default group; return (outputs on CPU, recorder)."""
    from .torch_comm import TorchComm

    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    comm = TorchComm(recorder=Recorder(dist.get_rank()), device=device)
    out = fn(comm, *_to_device(args, device), **_to_device(kwargs, device))
    comm.recorder.finish()
    return _to_cpu(out), comm.recorder


def _worker(work: Path, rank: int, world_size: int, backend: str, port: int, timeout: float) -> None:
    result: tuple
    try:
        fn, args, kwargs, path = cloudpickle.loads((work / "payload.pkl").read_bytes())
    except Exception as error:
        result = ("error", ImportError(f"rank {rank} could not load fn ({error}); define it at module level in an "
                                       f"importable module or in a notebook cell"))
    else:
        sys.path[:0] = [p for p in path if p not in sys.path]
        store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False, timeout=timedelta(seconds=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        try:
            outputs, recorder = _call_on_this_process(fn, args, kwargs, backend)
            result = ("ok", outputs, recorder)
        except Exception as error:  # noqa: BLE001 - reported to the parent, which raises it
            result = ("error", _picklable(error))
    if result[0] != "ok":
        (work / f"failed{rank}").touch()
    (work / f"result{rank}.pkl").write_bytes(cloudpickle.dumps(result))
    if dist.is_initialized():
        if result[0] == "ok":
            dist.barrier()
        dist.destroy_process_group()


def _picklable(error: BaseException) -> BaseException:
    try:
        cloudpickle.loads(cloudpickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(error).__name__}: {error}")


def main(argv: list[str] | None = None) -> None:
    """``torchrun --nproc-per-node N -m tpsp_sim.launch MODULE:FN [--backend gloo] [--out result.pt]``.

    Runs ``FN(comm)`` on every process of the torchrun job; rank 0 gathers every rank's output and
    trace, prints the trace table and, with ``--out``, saves ``{"outputs", "trace"}`` with ``torch.save``.
    """
    parser = argparse.ArgumentParser(prog="python -m tpsp_sim.launch", description=main.__doc__)
    parser.add_argument("target", nargs="?", help="MODULE:FN, a per-rank function fn(comm)")
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    parser.add_argument("--out", help="file for rank 0 to save the outputs and the trace")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    for name in ("--rank", "--world-size", "--port"):
        parser.add_argument(name, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.worker:
        _worker(Path(a.worker), a.rank, a.world_size, a.backend, a.port, a.timeout)
        return
    if not a.target or ":" not in a.target:
        parser.error("give the function as MODULE:FN")
    module, name = a.target.split(":", 1)
    sys.path.insert(0, os.getcwd())
    fn = getattr(importlib.import_module(module), name)
    dist.init_process_group(a.backend, timeout=timedelta(seconds=a.timeout))
    outputs, recorder = _call_on_this_process(fn, (), {}, a.backend)
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((outputs, recorder), gathered, dst=0)
    if dist.get_rank() == 0:
        result = RunResult([g[0] for g in gathered], CommTrace.from_recorders([g[1] for g in gathered]))
        print(result.trace.table())
        if a.out:
            torch.save({"outputs": result.outputs, "trace": result.trace}, a.out)
            print(f"saved outputs and trace of {len(gathered)} ranks to {a.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
