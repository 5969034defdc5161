"""Tensor- and sequence-parallel layers (Megatron-LM: Shoeybi et al. 2019, Korthikanti et al. 2022).

Activations are ``[batch, seq, features]``; sequence parallelism (SP) shards ``SEQUENCE_DIM = 1``.

    ColumnParallelLinear   A split on its outputs:  Y_i = X A_i^T + b_i        f before (SP: g)
    RowParallelLinear      B split on its inputs:   Y = sum_i X_i B_i^T + b     f̄ after  (SP: ḡ)

Every parameter is a copy of (a slice of) one dense module and carries Megatron's attributes:
``partition_dim`` (the dim it is split on, None when every rank holds all of it),
``partition_stride`` and ``sequence_parallel`` (True when it only sees this rank's tokens, so its
gradient must be summed over the group: ``sync_sequence_parallel_grads``). ``gather_dense_grads``
reads the same attributes to rebuild the dense gradients.

Dropout masks come from explicit ``torch.Generator``s (``DropoutRNG``): virtual ranks are threads,
and torch's default generator is shared by all of them.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.comm import Comm
from .mappings import copy_to_region, gather_from_region, reduce_from_region, reduce_scatter_to_sequence_region

SEQUENCE_DIM = 1


# ---- parameters: slices of a dense master -------------------------------------------------------

def _parameter(data: torch.Tensor, like: nn.Parameter, partition_dim: int | None = None, stride: int = 1,
               sequence_parallel: bool = False) -> nn.Parameter:
    p = nn.Parameter(data.detach().clone(), requires_grad=like.requires_grad)
    p.partition_dim, p.partition_stride, p.sequence_parallel = partition_dim, stride, sequence_parallel
    return p


def _shard(w: torch.Tensor, comm: Comm, dim: int, stride: int) -> torch.Tensor:
    """This rank's part of ``w``: ``dim`` is cut into stride·t equal pieces, rank r keeps r, r+t, r+2t, ..."""
    t = comm.world_size
    if w.shape[dim] % (stride * t):
        raise ValueError(f"rank {comm.rank}: cannot split size {w.shape[dim]} of dim {dim} (shape {tuple(w.shape)}) "
                         f"into {t} ranks x {stride} equal pieces")
    return torch.cat(w.chunk(stride * t, dim)[comm.rank::t], dim)


def _interleave(x: torch.Tensor, dim: int, t: int, stride: int) -> torch.Tensor:
    """Inverse of ``_shard`` on the concatenation of every rank's part (rank-major → dense order)."""
    dim = dim % x.dim()
    return x.unflatten(dim, (t, stride, -1)).transpose(dim, dim + 1).flatten(dim, dim + 2)


def replicate(module: nn.Module, *, sequence_parallel: bool = False) -> nn.Module:
    """A copy of ``module`` that every rank holds whole (e.g. a LayerNorm).

    With ``sequence_parallel`` it runs on sequence shards, so its parameters are marked for
    ``sync_sequence_parallel_grads``.
    """
    module = copy.deepcopy(module)
    for p in module.parameters():
        p.partition_dim, p.partition_stride, p.sequence_parallel = None, 1, sequence_parallel
    return module


# ---- linear layers ------------------------------------------------------------------------------

class _GatherLinear(torch.autograd.Function):
    """forward: all-gather the sequence shard, then X W^T + b; backward: all-gather X again, reduce-scatter dX.

    Only the shard is saved, so the memory of this input is divided by t (Korthikanti et al. §4.2.2;
    Megatron's LinearWithGradAccumulationAndAsyncCommunication).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, comm):
        ctx.save_for_backward(x, weight)
        ctx.comm, ctx.scope, ctx.has_bias = comm, comm.current_scope, bias is not None
        return F.linear(comm.all_gather(x, SEQUENCE_DIM), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        with ctx.comm.replay_scope(ctx.scope):
            total = ctx.comm.all_gather(x, SEQUENCE_DIM)
            grad_x = ctx.comm.reduce_scatter(grad @ weight, SEQUENCE_DIM)
        grad_2d = grad.flatten(0, -2)
        grad_w = grad_2d.T @ total.flatten(0, -2)
        grad_b = grad_2d.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


class ColumnParallelLinear(nn.Module):
    """Y_i = X A_i^T + b_i: this rank's slice of the output features (build with ``from_dense``).

    Input: X whole on every rank (f: identity forward, all-reduce backward), or with
    ``sequence_parallel`` this rank's sequence shard (g: all-gather forward, reduce-scatter backward).
    Output: this rank's output features for the full sequence, or all of them with ``gather_output``.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, comm: Comm, *,
                 sequence_parallel: bool = False, gather_output: bool = False) -> None:
        super().__init__()
        self.weight, self.bias, self.comm = weight, bias, comm
        self.sequence_parallel, self.gather_output = sequence_parallel, gather_output

    @classmethod
    def from_dense(cls, linear: nn.Linear, comm: Comm, *, sequence_parallel: bool = False,
                   gather_output: bool = False, stride: int = 1) -> "ColumnParallelLinear":
        """Slice ``linear``'s rows: rank r keeps output pieces r, r+t, ... of stride·t
        (``stride=3`` on a fused [q | k | v] projection gives each rank the q, k and v of its heads)."""
        weight = _parameter(_shard(linear.weight, comm, 0, stride), linear.weight, 0, stride)
        bias = None if linear.bias is None else _parameter(_shard(linear.bias, comm, 0, stride), linear.bias, 0, stride)
        return cls(weight, bias, comm, sequence_parallel=sequence_parallel, gather_output=gather_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            y = _GatherLinear.apply(x, self.weight, self.bias, self.comm)
        else:
            y = F.linear(copy_to_region(x, self.comm), self.weight, self.bias)
        if self.gather_output:
            y = _interleave(gather_from_region(y, self.comm, -1), -1, self.comm.world_size, self.weight.partition_stride)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.weight.shape[1]}, out_features_per_rank={self.weight.shape[0]}, "
                f"world_size={self.comm.world_size}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """Y = Σ_i X_i B_i^T + b: this rank holds the input features X_i (a column layer's output).

    The partial products are summed by f̄ (all-reduce), or with ``sequence_parallel`` by ḡ
    (reduce-scatter: each rank keeps its sequence shard of the sum). The bias is added once, after.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, comm: Comm, *,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        self.weight, self.bias, self.comm, self.sequence_parallel = weight, bias, comm, sequence_parallel

    @classmethod
    def from_dense(cls, linear: nn.Linear, comm: Comm, *, sequence_parallel: bool = False) -> "RowParallelLinear":
        """Slice ``linear``'s columns; the bias is copied whole (under SP it sees only this rank's tokens)."""
        weight = _parameter(_shard(linear.weight, comm, 1, 1), linear.weight, 1)
        bias = None if linear.bias is None else _parameter(linear.bias, linear.bias, sequence_parallel=sequence_parallel)
        return cls(weight, bias, comm, sequence_parallel=sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_region(y, self.comm, SEQUENCE_DIM)
        else:
            y = reduce_from_region(y, self.comm)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features_per_rank={self.weight.shape[1]}, out_features={self.weight.shape[0]}, "
                f"world_size={self.comm.world_size}, sequence_parallel={self.sequence_parallel}")


# ---- dropout ------------------------------------------------------------------------------------

class DropoutRNG:
    """Where dropout masks come from: Megatron's two random streams as explicit generators.

    ``default`` is the same stream on every rank (seeded with ``seed``): masks of tensors every rank
    holds whole. ``model_parallel`` is this rank's own stream (seeded with seed + 2718 + rank, as
    Megatron does): masks of sharded tensors (heads under TP, sequence shards under SP), so no two
    shards repeat one pattern. With ``exact``, every rank draws the FULL mask from ``default`` and
    keeps its slice, so the masks are a dense run's with the same seed (t times the random numbers:
    for checks). With no comm and no seed, ``default`` is torch's global generator (a plain model).
    """

    def __init__(self, seed: int | None = None, comm: Comm | None = None, exact: bool = False) -> None:
        if comm is not None and seed is None:
            raise ValueError("a DropoutRNG on ranks needs a seed (torch's global generator is shared by every virtual rank)")
        self.comm, self.exact = comm, exact
        self.manual_seed(seed)

    def manual_seed(self, seed: int | None) -> None:
        self.default = None if seed is None else torch.Generator().manual_seed(seed)
        self.model_parallel = None if self.comm is None else torch.Generator().manual_seed(seed + 2718 + self.comm.rank)

    def keep_mask(self, x: torch.Tensor, p: float, shard_dim: int | None) -> torch.Tensor:
        """A bool mask (1 byte per element) of ``x``, which is this rank's chunk of ``shard_dim`` (None: whole)."""
        if self.comm is None or shard_dim is None:
            return _bernoulli(x.shape, p, self.default)
        if not self.exact:
            return _bernoulli(x.shape, p, self.model_parallel)
        full = list(x.shape)
        full[shard_dim] *= self.comm.world_size
        return _bernoulli(full, p, self.default).chunk(self.comm.world_size, shard_dim)[self.comm.rank].clone()


def _bernoulli(shape, p: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator) >= p


class Dropout(nn.Module):
    """forward: x · mask / (1 - p), backward: grad · mask / (1 - p); the mask is drawn from ``rng``.

    ``shard_dim``: the dim this rank holds a chunk of (None: the whole tensor). Saves only the
    1-byte mask for backward.
    """

    def __init__(self, p: float, rng: DropoutRNG, shard_dim: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.rng, self.shard_dim = p, rng, shard_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * self.rng.keep_mask(x, self.p, self.shard_dim).to(x.device) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, shard_dim={self.shard_dim}"


# ---- gradients ----------------------------------------------------------------------------------

def sync_sequence_parallel_grads(module: nn.Module, comm: Comm) -> None:
    """Sum the gradients of ``sequence_parallel`` parameters over the group: call after backward, before the step.

    Under SP the LayerNorms and the row layers' bias see only this rank's tokens, so each rank holds
    part of their gradient (Megatron: ``finalize_model_grads``). An explicit call, not a hook, so
    gradient accumulation over micro-batches stays correct. One all-reduce of the flattened gradients.
    """
    grads = [p.grad for p in module.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads:
        return
    with comm.scope("sp_grads"):
        total = comm.all_reduce(torch.cat([g.flatten() for g in grads]))
    for g, summed in zip(grads, total.split([g.numel() for g in grads])):
        g.copy_(summed.view_as(g))


def gather_dense_grads(module: nn.Module, comm: Comm | None = None) -> dict[str, torch.Tensor]:
    """``{dense parameter name: full gradient}`` on every rank (collective: every rank must call it).

    Sharded gradients are all-gathered and put back in dense order; replicated ones are checked to
    be equal on every rank (under SP, call ``sync_sequence_parallel_grads`` first). ``comm``
    defaults to the one stored on the module's parallel layers.
    """
    return _gather_dense(module, comm, lambda p: p.grad, "gradient")


def gather_dense_parameters(module: nn.Module, comm: Comm | None = None) -> dict[str, torch.Tensor]:
    """``{dense parameter name: full value}`` on every rank, as ``gather_dense_grads`` does for gradients."""
    return _gather_dense(module, comm, lambda p: p.detach(), "value")


def _gather_dense(module: nn.Module, comm: Comm | None, get: Callable, what: str) -> dict[str, torch.Tensor]:
    comm = comm or next((m.comm for m in module.modules() if isinstance(getattr(m, "comm", None), Comm)), None)
    if comm is None:
        raise ValueError(f"{type(module).__name__} holds no parallel layer with a comm: pass comm=")
    dense = {}
    with comm.scope("gather_dense"):
        for name, p in module.named_parameters():
            x = get(p)
            if x is None:
                continue
            dim = getattr(p, "partition_dim", None)
            if dim is not None:
                dense[name] = _interleave(comm.all_gather(x, dim), dim, comm.world_size, p.partition_stride)
                continue
            copies = comm.all_gather(x.unsqueeze(0), 0)
            diff = (copies - copies[0]).abs().max().item()
            if diff != 0:
                hint = " (call ts.sync_sequence_parallel_grads first)" if getattr(p, "sequence_parallel", False) else ""
                raise ValueError(f"rank {comm.rank}: the {what} of replicated parameter {name!r} differs between "
                                 f"ranks by up to {diff:.3g}{hint}")
            dense[name] = x.clone()
    return dense
