"""Per-rank FLOP counting for the timeline: a dispatch mode on the rank's own thread."""

from __future__ import annotations

import functools
from typing import Any, Callable, Hashable, NamedTuple

import torch
from torch.utils import _python_dispatch
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

    def add(self, flops: int) -> None:
        """Count ``flops`` under the current label, as if an operation had computed them."""
        label = self._label()
        if not self._runs or self._runs[-1][0] != label:
            self._runs.append([label, 0])
        self._runs[-1][1] += flops

    def counted(self) -> int:
        """FLOPs counted since the previous ``take()``."""
        return sum(flops for _, flops in self._runs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = _FORMULAS.get(func._overloadpacket)
        if count is not None:
            self.add(int(count(*args, **kwargs, out_val=out)))
        return out


def shapes_only(fn: Callable) -> Callable:
    """``fn`` run once per distinct call on meta tensors while a ``FlopCounter`` counts (the planner's layers),
    its later calls answered from what that run left: the outputs' shapes, strides and dtypes, and its FLOPs.

    For functions whose outputs and FLOPs depend only on their tensors' shapes, strides and dtypes and
    their other arguments, and that make no communication call (which would close a compute span inside
    them) — the attention tiles, which a ring of p ranks computes p times a layer on the same shapes.
    Outputs are new tensors each time, never the inputs themselves. Meta tensors have no values, so nothing else could differ. Anywhere else (real tensors,
    autograd recording, no counter) ``fn`` runs as it is. tests/test_solo.py checks traces with and
    without it equal.
    """
    seen: dict[tuple, tuple[Any, int]] = {}

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        counter = _python_dispatch._get_current_dispatch_mode()
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if (not SHAPES_ONLY or not isinstance(counter, FlopCounter) or not tensors
                or not all(t.is_meta for t in tensors) or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
            return fn(*args, **kwargs)
        key = (tuple(_signature(a) for a in args), tuple((k, _signature(v)) for k, v in sorted(kwargs.items())))
        if key not in seen:
            if len(seen) >= SHAPES_KEPT:  # a long session of many models: start again rather than grow
                seen.clear()
            before = counter.counted()
            out = fn(*args, **kwargs)
            seen[key] = (_layout(out), counter.counted() - before)
            return out
        layout, flops = seen[key]
        counter.add(flops)
        return _rebuild(layout)

    return call


SHAPES_ONLY = True  # tests switch it off to compare
SHAPES_KEPT = 4096  # distinct calls remembered per function


def _signature(x: Any) -> Hashable:
    if isinstance(x, torch.Tensor):
        return "tensor", tuple(x.shape), x.stride(), x.dtype
    return x


class _Layout(NamedTuple):
    """What a meta tensor is: its shape, strides and dtype."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


def _layout(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return _Layout(tuple(out.shape), out.stride(), out.dtype)
    return tuple(_layout(o) for o in out)


def _rebuild(layout: Any) -> Any:
    if isinstance(layout, _Layout):
        return torch.empty_strided(layout.shape, layout.stride, dtype=layout.dtype, device="meta")
    return tuple(_rebuild(part) for part in layout)
