"""The dense model's gradients and parameters rebuilt from every rank's slices: what the checks compare."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from ..core.comm import Comm
from .fused import fused_to_dense
from .sharding import unshard


def gather_dense_grads(module: nn.Module, comm: Comm | None = None) -> dict[str, torch.Tensor]:
    """``{dense parameter name: full gradient}`` on every rank (collective: every rank must call it).

    Sharded gradients are all-gathered and put back in dense order; replicated ones are checked to
    be equal on every rank (under SP, call ``sync_sequence_parallel_grads`` first). ``comm``
    defaults to the one stored on the module's parallel layers. Recorded with phase "grad_sync".
    """
    return _gather_dense(module, comm, lambda p: p.grad, "gradient", phase="grad_sync")


def gather_dense_parameters(module: nn.Module, comm: Comm | None = None) -> dict[str, torch.Tensor]:
    """``{dense parameter name: full value}`` on every rank, as ``gather_dense_grads`` does for gradients."""
    return _gather_dense(module, comm, lambda p: p.detach(), "value")


def _gather_dense(module: nn.Module, comm: Comm | None, get: Callable, what: str,
                  phase: str | None = None) -> dict[str, torch.Tensor]:
    comm = comm or next((m.comm for m in module.modules() if isinstance(getattr(m, "comm", None), Comm)), None)
    if comm is None:
        raise ValueError(f"{type(module).__name__} holds no parallel layer with a comm: pass comm=")
    dense = {}
    with comm.phase(phase) if phase else nullcontext(), comm.scope("gather_dense"):
        for name, p in module.named_parameters():
            x = get(p)
            if x is None:
                continue
            dim = getattr(p, "partition_dim", None)
            if hasattr(p, "fused_pieces"):
                layer, _, leaf = name.rpartition(".")
                parent = layer.rpartition(".")[0]
                for i, (piece, copies) in enumerate(zip(p.fused_pieces, fused_to_dense(
                        comm.all_gather(x, 0), 0, p.fused_pieces, comm.world_size))):
                    path = (layer, str(i)) if piece.name is None else (parent, piece.name)
                    dense_name = ".".join(filter(None, (*path, leaf)))
                    _check_copies(torch.stack(copies), dense_name, what, comm, "replicated heads of ")
                    dense[dense_name] = copies[0]
            elif dim is not None:
                dense[name] = unshard(comm.all_gather(x, dim), dim, comm.world_size, p.partition_stride)
            else:
                hint = " (call ts.sync_sequence_parallel_grads first)" if getattr(p, "sequence_parallel", False) else ""
                _check_copies(comm.all_gather(x.unsqueeze(0), 0), name, what, comm, "replicated parameter ", hint)
                dense[name] = x.clone()
    return dense


def _check_copies(copies: torch.Tensor, name: str, what: str, comm: Comm, kind: str, hint: str = "") -> None:
    """ValueError unless the copies (stacked on dim 0) are equal; meta tensors have no values to compare."""
    if copies.is_meta:
        return
    diff = (copies - copies[0]).abs().max().item()
    if diff != 0:
        raise ValueError(f"rank {comm.rank}: the {what} of {kind}{name!r} differs between ranks by up to {diff:.3g}{hint}")
