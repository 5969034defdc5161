"""Gradients never reduced make the optimizer step fail, naming the rank and the parameter.

``DistributedDataParallel.no_sync()`` and FSDP's ``set_requires_gradient_sync(False)`` keep each rank's
local gradients for gradient accumulation; the last micro-batch's backward must reduce them. Forget it
and every replica steps on its own data (DDP: the replicas drift apart) or on nothing (FSDP: the sharded
``.grad`` is None and torch's optimizers skip the parameter) — a wrong model, silently.

So each wrapper ``mark``s its parameters when a backward leaves their gradients unreduced and
``clear``s them once a backward reduces them, and one global optimizer step pre-hook
(``torch.optim.optimizer.register_optimizer_step_pre_hook``) raises ``SimulationError`` before any
``torch.optim`` optimizer steps a marked parameter. Global because the wrappers never see the optimizer
the user builds (``torch.optim.AdamW(model.parameters())``), so a per-optimizer hook could not be
installed; registered once, on the first ``mark``. It looks each parameter up in a weak identity map
(nothing is kept alive, O(parameters) per step, nothing to do while no gradient is unreduced). Updates
made without an optimizer are caught by the wrappers' next forward (the parameters' version counters).
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from ..core.errors import SimulationError

_UNREDUCED = WeakIdKeyDictionary()  # parameter -> the error message an optimizer step on it raises
_LOCK = threading.Lock()  # the virtual ranks are threads of one process
_HOOK: list[Any] = []  # the global hook's handle, once registered


def mark(params: Iterable[tuple[str, torch.Tensor]], message: str) -> None:
    """Mark each (name, parameter) as holding an unreduced gradient; an optimizer step on it raises
    ``message`` with ``{name}`` filled in."""
    with _LOCK:
        if not _HOOK:
            _HOOK.append(register_optimizer_step_pre_hook(_refuse_unreduced))
        for name, p in params:
            _UNREDUCED[p] = message.format(name=name)


def clear(params: Iterable[torch.Tensor]) -> None:
    """The gradients of ``params`` were reduced: an optimizer may step them."""
    with _LOCK:
        for p in params:
            _UNREDUCED.pop(p, None)


def _refuse_unreduced(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """The global step pre-hook: the first marked parameter of ``optimizer`` is an error."""
    if not len(_UNREDUCED):
        return
    with _LOCK:
        message = next((_UNREDUCED[p] for group in optimizer.param_groups for p in group["params"]
                        if p in _UNREDUCED), None)
    if message is not None:
        raise SimulationError(message)
