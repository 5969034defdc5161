"""``ts.run``: call a per-rank function on virtual ranks (sim/) or on real processes (dist/)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .core.result import RunResult
from .dist.processes import run_processes
from .sim.runtime import run_virtual
from .torch_api import backend as torch_api

BACKENDS = ("sim", "gloo", "nccl")


def run(fn: Callable[..., Any], *args: Any, world_size: int, backend: str = "sim",
        timeout: float | None = None, count_flops: bool = False, torch_distributed: bool = False,
        **kwargs: Any) -> RunResult:
    """Call ``fn(comm, *args, **kwargs)`` on every rank; return ``RunResult(outputs, trace)``.

    ``backend="sim"`` runs ``world_size`` virtual ranks as threads of this process (timeout
    default 600 s); ``"gloo"`` / ``"nccl"`` start real processes (timeout default 120 s,
    counted once every process has joined; how failures are blamed: dist/processes.py; NCCL
    needs one GPU per rank, and tensor arguments are moved to each rank's GPU). ``count_flops``
    (simulator only) records the FLOPs each rank computes between communications, for
    ``ts.timeline``. ``torch_distributed=True`` gives every rank an initialised torch.distributed
    default group on the run's own backend, so ``dist.*``, DTensor and FSDP2 code runs inside ``fn``
    and is recorded in the trace (torch_api/).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout < math.inf):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}"
                         + (" (a finite one, the same on every backend)" if timeout == math.inf else ""))
    _refuse_autograd_history((args, kwargs))
    if backend != "sim" and count_flops:
        raise ValueError("count_flops is available on the simulator only (backend='sim')")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend='nccl' needs one GPU per rank: world_size={world_size}, "
                         f"GPUs visible={torch.cuda.device_count()}")
    with torch_api.failure_says_why_no_default_group():
        if backend == "sim":
            with torch_api.installed() if torch_distributed else torch_api.no_default_group_left():
                return run_virtual(fn, args, kwargs, world_size, timeout=600.0 if timeout is None else timeout,
                                   count_flops=count_flops,
                                   rank_context=torch_api.default_group if torch_distributed else None)
        # a worker's dist.* calls see the default group only with the flag, as on the simulator
        return run_processes(fn, args, kwargs, world_size, backend, 120.0 if timeout is None else timeout,
                             torch_api.on_default_group if torch_distributed else torch_api.without_default_group)


def _refuse_autograd_history(obj: Any) -> None:
    """Every rank gets its own copy of the tensors among the arguments (in lists, tuples and dicts): a
    tensor with autograd history cannot be copied (nor pickled for a real backend), so it is a ValueError."""
    if isinstance(obj, torch.Tensor) and obj.grad_fn is not None:
        raise ValueError(f"ts.run: an argument is a tensor with autograd history (shape {tuple(obj.shape)}, "
                         f"grad_fn={type(obj.grad_fn).__name__}); every rank gets its own copy of its tensor "
                         f"arguments, which a non-leaf cannot be: pass x.detach() (with .requires_grad_() if "
                         f"the ranks need its gradient)")
    if isinstance(obj, (list, tuple)):
        for item in obj:
            _refuse_autograd_history(item)
    if isinstance(obj, dict):
        for item in obj.values():
            _refuse_autograd_history(item)
