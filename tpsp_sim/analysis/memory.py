"""Activation memory per rank: what autograd saves for backward, measured and predicted.

``saved_tensor_meter()`` counts the bytes of the distinct storages saved for backward while it is
open (``torch.autograd.graph.saved_tensors_hooks``, which are per thread, so each virtual rank
measures its own). ``activation_memory`` is Korthikanti et al. 2022's count per transformer layer
(16-bit activations, 1-byte dropout masks; s sequence, b batch, h hidden, a heads, t TP size):

    "none"   sbh (34 + 5as/h)              §4.1
    "tp"     sbh (10 + 24/t + 5as/(ht))    §4.2.1
    "tp_sp"  sbh/t (34 + 5as/h)            §4.2.2

Measured on ``ts.TransformerBlock`` / ``ts.ParallelTransformerBlock`` in bfloat16 with dropout on
(parameters excluded), term by term, per rank (under "tp" the first three rows are whole, under
"tp_sp" divided by t):

    term                                   paper     measured
    ln1, ln2 inputs                        4sbh      4sbh      + mean and rstd, [b, s, 1] each in the
                                                               activation dtype: 4 x 2bs bytes
    qkv, fc1 inputs (LayerNorm outputs)    4sbh      4sbh      under tp_sp the shard: g is fused with
                                                               the matmul and re-gathered in backward
    residual dropout masks                 2sbh      2sbh      bool, 1 byte
    q, k (for Q K^T), v (for P V)          6sbh/t    6sbh/t    copies made by matmul's batch folding
    softmax output, its dropout mask and   5as²b/t   5as²b/t   2 + 1 + 2 bytes per score
      the dropped probabilities
    proj input                             2sbh/t    2sbh/t
    fc1 output (GELU input), GELU output   16sbh/t   16sbh/t
    causal mask                            -         0         added as a bias, which saves nothing

So the meter is the paper's count plus the LayerNorm statistics, 8bs bytes per layer (8bs/t under
tp_sp): a fraction 8/(h(34 + 5as/h)) of the total, under 0.4% for h >= 64. The paper leaves them
out as small. Scalars (1/sqrt(d), 1/(1-p)) are not saved.
"""

from __future__ import annotations

import threading
from typing import Iterable

import torch

MODES = ("none", "tp", "tp_sp")


def activation_memory(mode: str, seq: int, batch: int, hidden: int, heads: int, t: int = 1) -> float:
    """Korthikanti et al. 2022's activation bytes per transformer layer and rank (16-bit activations)."""
    s, b, h, a = seq, batch, hidden, heads
    if mode == "none":
        return s * b * h * (34 + 5 * a * s / h)
    if mode == "tp":
        return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    if mode == "tp_sp":
        return s * b * h / t * (34 + 5 * a * s / h)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


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
