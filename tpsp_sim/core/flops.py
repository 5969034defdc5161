"""Per-rank FLOP counting for the timeline: a dispatch mode on the rank's own thread."""

from __future__ import annotations

from typing import Any, Callable, Hashable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

_aten = torch.ops.aten
# torch's table lacks the CPU kernels of scaled_dot_product_attention; they do the flash kernels' work.
_FORMULAS = {**flop_registry,
             _aten._scaled_dot_product_flash_attention_for_cpu:
                 flop_registry[_aten._scaled_dot_product_flash_attention],
             _aten._scaled_dot_product_flash_attention_for_cpu_backward:
                 flop_registry[_aten._scaled_dot_product_flash_attention_backward]}


class FlopCounter(TorchDispatchMode):
    """Counts the FLOPs of matmuls and attention kernels (``torch.utils.flop_counter``'s table).

    Dispatch modes are per thread, so each virtual rank counts only its own work. With a ``label``
    function (the simulator passes the rank's (scope, phase)), consecutive FLOPs with the same label
    form one run, so work done at the end of a forward is never booked to the backward after it.
    """

    def __init__(self, label: Callable[[], Hashable] = lambda: None) -> None:
        super().__init__()
        self._label = label
        self._runs: list[list] = []  # [label, flops], in order

    def take(self) -> list[tuple[Hashable, int]]:
        """The (label, FLOPs) runs counted since the previous ``take()``."""
        runs, self._runs = self._runs, []
        return [(label, flops) for label, flops in runs]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = _FORMULAS.get(func._overloadpacket)
        if count is not None:
            label = self._label()
            if not self._runs or self._runs[-1][0] != label:
                self._runs.append([label, 0])
            self._runs[-1][1] += int(count(*args, **kwargs, out_val=out))
        return out


def count_flops(fn: Callable, *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Run ``fn(*args, **kwargs)`` and return (its result, the FLOPs it computed on this thread)."""
    with FlopCounter() as counter:
        out = fn(*args, **kwargs)
    return out, sum(flops for _, flops in counter.take())

