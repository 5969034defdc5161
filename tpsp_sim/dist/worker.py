"""The process side of a real run: one rank of ``torch.distributed`` calling the per-rank ``fn``.

``ts.run(..., backend="gloo")`` starts this module once per rank (``--worker``); under ``torchrun``
it runs any module-level function::

    torchrun --nproc-per-node 4 -m tpsp_sim.dist.worker mymodule:fn --out result.pt
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import cloudpickle
import torch
import torch.distributed as dist

from ..core.errors import describe_error
from ..core.result import RunResult
from ..core.trace import CommTrace, Recorder
from .call_log import CallLog
from .torch_comm import TorchComm


def _map_tensors(obj: Any, f: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``f`` to every tensor inside nested lists, tuples and dicts."""
    if isinstance(obj, torch.Tensor):
        return f(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, f) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, f) for k, v in obj.items()}
    return obj


def _call_on_this_process(fn: Callable, args: tuple, kwargs: dict, backend: str,
                          calls: CallLog | None = None) -> tuple[Any, Recorder]:
    """Run ``fn`` on this process's rank of the initialised default group; return (outputs on CPU, recorder)."""
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    comm = TorchComm(recorder=Recorder(dist.get_rank()), device=device, calls=calls)
    to_device = lambda t: t.to(device)  # noqa: E731
    out = fn(comm, *_map_tensors(args, to_device), **_map_tensors(kwargs, to_device))
    comm.recorder.finish()
    return _map_tensors(out, lambda t: t.detach().cpu()), comm.recorder


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent_pid: int, parent_pipe: int) -> None:
    """End this process as soon as the process that started it ends, however it ends.

    Linux: the kernel sends SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG), even to a process
    stuck in native code; a parent that died before that call is caught by the getppid check.
    Everywhere: a thread waits on a pipe whose write end only the parent holds; the pipe reads
    end-of-file once the parent is gone.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while os.read(parent_pipe, 1):
            pass
        os._exit(1)

    threading.Thread(target=watch, name="tpsp_sim-parent-watch", daemon=True).start()


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` so that a reader sees all of it or no file."""
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)


def _worker(work: Path, rank: int, world_size: int, backend: str, port: int, timeout: float,
            start_timeout: float) -> None:
    """One rank of ``ts.run``: load fn, join the group, call fn; report to the parent through ``work``.

    The ranks first wait (up to ``start_timeout`` seconds) until every one of them has started, so
    that a slow start (importing torch on a busy machine) does not eat into the group's ``timeout``.

    ``result{rank}.pkl`` holds (outputs, recorder), or ``error{rank}.pkl`` (exception, whether a
    torch.distributed call raised it).
    """
    result: tuple
    calls = CallLog(work / f"calls{rank}")
    sys.path[:0] = [p for p in json.loads((work / "sys_path.json").read_text()) if p not in sys.path]
    try:
        fn, args, kwargs = cloudpickle.loads((work / "payload.pkl").read_bytes())
    except Exception as error:
        result = ("error", ImportError(f"rank {rank} could not load fn ({error}); define it at module level in an "
                                       f"importable module or in a notebook cell"), False)
    else:
        try:
            with calls.failures():
                store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False,
                                      timeout=timedelta(seconds=start_timeout))
                calls.started()
                store.set(f"started{rank}", "1")
                store.wait([f"started{r}" for r in range(world_size)])
                store.set_timeout(timedelta(seconds=timeout))
                dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                        timeout=timedelta(seconds=timeout))
            calls.joined()
            outputs, recorder = _call_on_this_process(fn, args, kwargs, backend, calls)
            result = ("result", outputs, recorder)
        except BaseException as error:  # noqa: BLE001 - sys.exit too: reported to the parent, which raises it
            result = ("error", _picklable(error), calls.comm_failed)
    calls.close()
    try:
        data = cloudpickle.dumps(result[1:])
    except Exception as error:  # noqa: BLE001 - fn's outputs (an error is made picklable above)
        data = cloudpickle.dumps((TypeError(f"fn returned {type(result[1]).__name__} holding what cannot be pickled "
                                            f"to send it back to ts.run's process ({error}); return tensors, numbers "
                                            f"and lists, tuples or dicts of them"), False))
        result = ("error",)
    _write_atomically(work / f"{result[0]}{rank}.pkl", data)
    if dist.is_initialized():
        if result[0] == "result":
            dist.barrier()
        dist.destroy_process_group()


def _picklable(error: BaseException) -> BaseException:
    try:
        cloudpickle.loads(cloudpickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(describe_error(error))


def main(argv: list[str] | None = None) -> None:
    """``torchrun --nproc-per-node N -m tpsp_sim.dist.worker MODULE:FN [--backend gloo] [--out result.pt]``.

    Runs ``FN(comm)`` on every process of the torchrun job; rank 0 gathers every rank's output and
    trace, prints the trace table and, with ``--out``, saves ``{"outputs", "trace"}`` with ``torch.save``.
    """
    parser = argparse.ArgumentParser(prog="python -m tpsp_sim.dist.worker", description=main.__doc__)
    parser.add_argument("target", nargs="?", help="MODULE:FN, a per-rank function fn(comm)")
    parser.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    parser.add_argument("--out", help="file for rank 0 to save the outputs and the trace")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    for name in ("--rank", "--world-size", "--port", "--parent-pid", "--parent-pipe"):
        parser.add_argument(name, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    parser.add_argument("--start-timeout", type=float, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.worker:
        _die_with_parent(a.parent_pid, a.parent_pipe)
        _worker(Path(a.worker), a.rank, a.world_size, a.backend, a.port, a.timeout, a.start_timeout)
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
