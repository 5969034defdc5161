"""Tensor- and sequence-parallel layers (Megatron-LM: Shoeybi et al. 2019, Korthikanti et al. 2022).

Activations are ``[batch, seq, features]``; sequence parallelism (SP) shards ``SEQUENCE_DIM = 1``.

    ColumnParallelLinear   A split on its outputs:  Y_i = X A_i^T + b_i        f before (SP: g)
    RowParallelLinear      B split on its inputs:   Y = sum_i X_i B_i^T + b     f̄ after  (SP: ḡ)

Every parameter is a copy of (a slice of) one dense module and carries Megatron's attributes:
``partition_dim`` (the dim it is split on, None when every rank holds all of it),
``partition_stride`` and ``sequence_parallel`` (True when it only sees this rank's tokens, so its
gradient must be summed over the group: ``sync_sequence_parallel_grads``). ``gather_dense_grads``
reads the same attributes to rebuild the dense gradients.

A column layer can also be built from several dense linears that read one input (q, k, v; gate,
up): ``ColumnParallelLinear.from_dense([q, k, v], comm, heads=(8, 2, 2))``. Each rank's weight is
[q_r; k_r; v_r], the rows of its heads, so the sublayer costs one collective (Megatron's fused
linear_qkv). With fewer K/V heads than ranks each K/V head is replicated on t / n_kv ranks (as
vLLM's QKVParallelLinear does); every replica sees only its ranks' query heads, so the backward
all-reduces the replicated rows' weight gradient over the ranks sharing the head (2(g-1)/g · 2·d_head·h
elements per rank for g = t / n_kv replicas), after which every replica holds the dense gradient.
The fused weight carries ``fused_pieces``, which ``gather_dense_grads`` reads to return each
piece under its dense name.

Dropout masks come from explicit ``torch.Generator``s (``DropoutRNG``): virtual ranks are threads,
and torch's default generator is shared by all of them.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.autograd import CommFunction
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

class _GatherLinear(CommFunction):
    """forward: all-gather the sequence shard, then X W^T + b; backward: all-gather X again, reduce-scatter dX.

    Only the shard is saved, so the memory of this input is divided by t (Korthikanti et al. §4.2.2;
    Megatron's LinearWithGradAccumulationAndAsyncCommunication).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, comm):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(comm.all_gather(x, SEQUENCE_DIM), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        total = ctx.comm.all_gather(x, SEQUENCE_DIM)
        grad_x = ctx.comm.reduce_scatter(grad @ weight, SEQUENCE_DIM)
        grad_2d = grad.flatten(0, -2)
        grad_w = grad_2d.T @ total.flatten(0, -2)
        grad_b = grad_2d.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


@dataclass(frozen=True)
class _Piece:
    """One dense linear of a fused column layer, as this rank holds it."""

    name: str | None  # dense module name beside the fused layer (None: "<fused layer>.<index>")
    units: int        # heads, or output features when the piece has no heads
    unit_rows: int    # dense rows per unit (head_dim, or 1)
    replicas: int     # ranks holding each unit (t / units when units < t, else 1)
    start: int        # this rank's first dense row
    local_rows: int


def _plan_pieces(linears: Sequence[nn.Linear], heads: Sequence[int] | None, names: Sequence[str] | None,
                 comm: Comm) -> list[_Piece]:
    """Which rows of each dense linear this rank keeps: units (heads) split over t, or replicated when t > units."""
    t, r = comm.world_size, comm.rank
    labels = list(names) if names is not None else [str(i) for i in range(len(linears))]
    where = f"rank {r}: ColumnParallelLinear.from_dense([{', '.join(labels)}])"
    if heads is not None and len(heads) != len(linears) or names is not None and len(names) != len(linears):
        raise ValueError(f"{where}: got {len(linears)} linears, heads={heads}, names={names}")
    if len({lin.in_features for lin in linears}) != 1 or len({lin.bias is None for lin in linears}) != 1:
        raise ValueError(f"{where}: fused linears must share in_features and all have (or all lack) a bias; got "
                         f"in_features {[lin.in_features for lin in linears]}, "
                         f"bias {[lin.bias is not None for lin in linears]}")
    pieces = []
    for i, (label, lin) in enumerate(zip(labels, linears)):
        rows, name = lin.out_features, None if names is None else names[i]
        units = rows if heads is None else heads[i]
        if units < 1 or rows % units:
            raise ValueError(f"{where}: {label} has {rows} output features, not divisible into {units} heads")
        unit_rows = rows // units
        if units % t == 0:
            per_rank = units // t
            pieces.append(_Piece(name, units, unit_rows, 1, r * per_rank * unit_rows, per_rank * unit_rows))
        elif heads is not None and t % units == 0:
            replicas = t // units
            pieces.append(_Piece(name, units, unit_rows, replicas, r // replicas * unit_rows, unit_rows))
        else:
            what = f"{units} heads" if heads is not None else f"{rows} output features"
            raise ValueError(f"{where}: {label} has {what}, which cannot be split over t={t} ranks "
                             f"({'t must divide the heads or be a multiple of them' if heads is not None else 'not divisible'})")
    return pieces


def _fused_shard(tensors: Sequence[torch.Tensor], pieces: Sequence[_Piece]) -> torch.Tensor:
    return torch.cat([x[p.start:p.start + p.local_rows] for x, p in zip(tensors, pieces)], 0)


def _fused_to_dense(x: torch.Tensor, dim: int, pieces: Sequence[_Piece], t: int) -> list[list[torch.Tensor]]:
    """Every rank's fused block concatenated on ``dim`` → per piece, the list of its copies of the dense
    tensor (one per replica: all equal for values and summed gradients)."""
    blocks = [b.split([p.local_rows for p in pieces], dim) for b in x.chunk(t, dim)]
    return [[torch.cat([blocks[r][i] for r in range(copy_, t, p.replicas)], dim) for copy_ in range(p.replicas)]
            for i, p in enumerate(pieces)]


def _replica_groups(pieces: Sequence[_Piece], comm: Comm) -> list[tuple[Comm, list[slice]]]:
    """(the group of ranks sharing my heads, my rows of those heads) per replication factor; collective."""
    groups, offsets = [], [0]
    for p in pieces:
        offsets.append(offsets[-1] + p.local_rows)
    for replicas in sorted({p.replicas for p in pieces} - {1}):
        mine = None
        for first in range(0, comm.world_size, replicas):  # every rank creates every group, in one order
            group = comm.new_group(range(first, first + replicas))
            mine = group if group is not None else mine
        rows = [slice(offsets[i], offsets[i + 1]) for i, p in enumerate(pieces) if p.replicas == replicas]
        groups.append((mine, rows))
    return groups


class _SumOverReplicas(CommFunction):
    """forward: identity on a fused weight, backward: all-reduce the rows of replicated heads over their replicas."""

    @staticmethod
    def forward(ctx, w, groups, comm):  # comm: the layer's, whose recorder the replica groups share
        ctx.groups = groups
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        for group, rows in ctx.groups:
            summed = group.all_reduce(torch.cat([grad[r] for r in rows]))
            for r, part in zip(rows, summed.split([r.stop - r.start for r in rows])):
                grad[r] = part
        return grad, None, None


class ColumnParallelLinear(nn.Module):
    """Y_i = X A_i^T + b_i: this rank's slice of the output features (build with ``from_dense``).

    Input: X whole on every rank (f: identity forward, all-reduce backward), or with
    ``sequence_parallel`` this rank's sequence shard (g: all-gather forward, reduce-scatter backward).
    Output: this rank's output features for the full sequence, or all of them with ``gather_output``.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, comm: Comm, *,
                 sequence_parallel: bool = False, gather_output: bool = False,
                 replica_groups: Sequence[tuple[Comm, list[slice]]] = ()) -> None:
        super().__init__()
        self.weight, self.bias, self.comm = weight, bias, comm
        self.sequence_parallel, self.gather_output = sequence_parallel, gather_output
        self.replica_groups = list(replica_groups)

    @classmethod
    def from_dense(cls, linear: nn.Linear | Sequence[nn.Linear], comm: Comm, *, sequence_parallel: bool = False,
                   gather_output: bool = False, stride: int = 1, heads: Sequence[int] | None = None,
                   names: Sequence[str] | None = None) -> "ColumnParallelLinear":
        """Slice ``linear``'s rows: rank r keeps output pieces r, r+t, ... of stride·t
        (``stride=3`` on a fused [q | k | v] projection gives each rank the q, k and v of its heads).

        A list of linears (or ``heads``) fuses them: rank r keeps its share of each one's ``heads``
        (output features when ``heads`` is None), replicated when t is a multiple of a piece's heads.
        ``names``: the pieces' dense module names beside this layer (gather_dense_grads reports
        ``<parent>.<name>.weight``; default ``<this layer>.<i>.weight``, as an ``nn.ModuleList``).
        """
        if isinstance(linear, nn.Linear) and heads is None and names is None:
            weight = _parameter(_shard(linear.weight, comm, 0, stride), linear.weight, 0, stride)
            bias = None if linear.bias is None else _parameter(_shard(linear.bias, comm, 0, stride), linear.bias, 0, stride)
            return cls(weight, bias, comm, sequence_parallel=sequence_parallel, gather_output=gather_output)
        linears = [linear] if isinstance(linear, nn.Linear) else list(linear)
        if stride != 1:
            raise ValueError(f"rank {comm.rank}: ColumnParallelLinear.from_dense takes stride or fused linears, not both")
        pieces = _plan_pieces(linears, heads, names, comm)
        weight = _parameter(_fused_shard([lin.weight for lin in linears], pieces), linears[0].weight, 0)
        bias = None if linears[0].bias is None else _parameter(
            _fused_shard([lin.bias for lin in linears], pieces), linears[0].bias, 0)
        for p in (weight, bias):
            if p is not None:
                p.fused_pieces = pieces
        return cls(weight, bias, comm, sequence_parallel=sequence_parallel, gather_output=gather_output,
                   replica_groups=_replica_groups(pieces, comm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.replica_groups:
            weight = _SumOverReplicas.apply(weight, self.replica_groups, self.comm)
            bias = None if bias is None else _SumOverReplicas.apply(bias, self.replica_groups, self.comm)
        if self.sequence_parallel:
            y = _GatherLinear.apply(x, weight, bias, self.comm)
        else:
            y = F.linear(copy_to_region(x, self.comm), weight, bias)
        if self.gather_output:
            y = gather_from_region(y, self.comm, -1)
            pieces = getattr(self.weight, "fused_pieces", None)
            y = (_interleave(y, -1, self.comm.world_size, self.weight.partition_stride) if pieces is None
                 else torch.cat([copies[0] for copies in _fused_to_dense(y, -1, pieces, self.comm.world_size)], -1))
        return y

    def extra_repr(self) -> str:
        pieces = getattr(self.weight, "fused_pieces", None)
        fused = "" if pieces is None else ", pieces=[" + ", ".join(  # e.g. "k 1/2 x2": 1 of 2 heads, on 2 ranks
            f"{p.name or i} {p.local_rows // p.unit_rows}/{p.units}" + (f" x{p.replicas}" if p.replicas > 1 else "")
            for i, p in enumerate(pieces)) + "]"
        return (f"in_features={self.weight.shape[1]}, out_features_per_rank={self.weight.shape[0]}, "
                f"world_size={self.comm.world_size}, sequence_parallel={self.sequence_parallel}{fused}")


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
        self.comm, self.exact = comm, exact
        self.manual_seed(seed)

    def manual_seed(self, seed: int | None) -> None:
        if self.comm is not None and seed is None:
            raise ValueError(f"rank {self.comm.rank}: a DropoutRNG on ranks needs a seed "
                             "(torch's global generator is shared by every virtual rank)")
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
    gradient accumulation over micro-batches stays correct. One all-reduce of the flattened gradients,
    recorded with phase "grad_sync".
    """
    grads = [p.grad for p in module.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if grads:
        all_reduce_bucket(grads, comm, "sp_grads")


def all_reduce_bucket(grads: list[torch.Tensor], comm: Comm, scope: str, op: str = "sum") -> None:
    """All-reduce ``grads`` in place as one bucket: flattened, concatenated, one all-reduce with ``op``,
    recorded with phase "grad_sync" under ``scope``."""
    with comm.phase("grad_sync"), comm.scope(scope):
        total = comm.all_reduce(torch.cat([g.flatten() for g in grads]), op=op)
    for g, reduced in zip(grads, total.split([g.numel() for g in grads])):
        g.copy_(reduced.view_as(g))


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
                for i, (piece, copies) in enumerate(zip(p.fused_pieces, _fused_to_dense(
                        comm.all_gather(x, 0), 0, p.fused_pieces, comm.world_size))):
                    path = (layer, str(i)) if piece.name is None else (parent, piece.name)
                    dense_name = ".".join(filter(None, (*path, leaf)))
                    _check_copies(torch.stack(copies), dense_name, what, comm, "replicated heads of ")
                    dense[dense_name] = copies[0]
            elif dim is not None:
                dense[name] = _interleave(comm.all_gather(x, dim), dim, comm.world_size, p.partition_stride)
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
