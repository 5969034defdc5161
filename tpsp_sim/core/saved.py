"""``saved_tensor_meter``: the bytes a forward keeps for backward, measured (saved-tensor hooks, per thread)."""

from __future__ import annotations

import threading
from typing import Iterable

import torch


class saved_tensor_meter:
    """Context manager: ``.nbytes`` is the bytes of distinct storages saved for backward while open.

    A storage saved twice (q and k as views of one qkv output, say) counts once; storages of the
    tensors in ``exclude`` (e.g. ``model.parameters()``) do not count. Meters nest (torch applies
    only the innermost saved-tensor hooks, so the innermost meter counts for every open one). Per
    thread: on virtual ranks, open it inside the rank's function.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {_key(t) for t in exclude}
        self._storages: dict[tuple, torch.UntypedStorage] = {}
        self.nbytes = 0

    def _count(self, t: torch.Tensor) -> None:
        key = _key(t)
        if key not in self._excluded and key not in self._storages:
            self._storages[key] = t.untyped_storage()  # kept alive while open, so its address is not reused
            self.nbytes += t.untyped_storage().nbytes()

    @staticmethod
    def _pack(t: torch.Tensor) -> torch.Tensor:
        for meter in _open.meters:
            meter._count(t)
        return t

    def __enter__(self) -> "saved_tensor_meter":
        if not hasattr(_open, "meters"):
            _open.meters = []
        _open.meters.append(self)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        _open.meters.remove(self)
        self._storages.clear()


_open = threading.local()  # the meters open on this thread


def _key(t: torch.Tensor) -> tuple:
    return t.device, t.untyped_storage().data_ptr()
