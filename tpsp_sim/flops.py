"""Per-rank FLOP counting for the timeline: a dispatch mode on the rank's own thread."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class FlopCounter(TorchDispatchMode):
    """Counts the FLOPs of matmuls and attention kernels (``torch.utils.flop_counter``'s table).

    Dispatch modes are per thread, so each virtual rank counts only its own work. ``take()``
    returns the FLOPs since the previous ``take()``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._flops = 0

    def take(self) -> int:
        flops, self._flops = self._flops, 0
        return flops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self._flops += int(count(*args, **kwargs, out_val=out))
        return out


def count_flops(fn, *args, **kwargs) -> tuple[object, int]:
    """Run ``fn(*args, **kwargs)`` and return (its result, the FLOPs it computed on this thread)."""
    with FlopCounter() as counter:
        out = fn(*args, **kwargs)
    return out, counter.take()

