"""One transformer block's communication under each parallelism, for the report and the dashboard.

Each method is one small per-rank function: it builds this rank's inputs for a ``Config`` and runs
forward and backward. On ``device="meta"`` (the default) tensors have shapes but no data: the
simulator records the same calls, bytes and FLOPs without computing anything, so realistic sizes
take seconds. The block is ``TransformerBlock`` for "tp" and "tp_sp"; for context parallelism (every
kind of ``ts.context_parallel.registry`` that runs on one group: "ring", "ulysses", "allgather"; USP
needs a split of the ranks in two) the rest of the block is local to each rank, so its communication
is its attention's (causal; in the zigzag layout where the kind cuts the sequence, which balances the
work).

After backward each method reduces the gradients its group holds in pieces (phase "grad_sync"): "tp" nothing (its weights are sharded); "tp_sp" the
sequence-parallel LayerNorm and row-bias gradients (``sync_sequence_parallel_grads``, 4h + 2h
elements per block); a context-parallel kind *every* weight gradient of the block, because context parallelism
replicates the weights over its group, like data parallelism: one all-reduce of the block's
P parameters, 2(p-1)/p · P · dtype bytes on the wire per rank (P = 12h² + 13h for
``TransformerBlock``: at h = 1024, p = 4 in bf16, 1.5 × 24 MiB = 36 MiB per block).

The two kinds of traffic are paid at different rates, and a ``Point`` keeps them apart: the
activations' (forward and backward) on every **micro-batch**, the gradient reduction once per
**optimizer step** of N micro-batches — gradients accumulate locally and are reduced after the last
backward, as Megatron-LM does, in one reduction over dp × cp that data parallelism needs anyway.
``Point.step_bytes(N)`` / ``Point.step_exposed(N)`` add them up for a step of N micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch

from ..hybrid.block import ParallelTransformerBlock
from ..hybrid.context import context_groups
from ..models.gpt import TransformerBlock
from ..tensor_parallel.grad_sync import sync_sequence_parallel_grads
from ..core.comm import Comm
from .cluster import Cluster, cluster
from .cost import format_seconds
from ..launch import run
from ..context_parallel.registry import ATTENTIONS, attention_kind
from .replay import Span, Timeline, timeline
from ..core.table import Table
from ..core.trace import CommTrace, format_bytes

TENSOR_PARALLEL = ("tp", "tp_sp")


def all_methods() -> tuple[str, ...]:
    """"tp", "tp_sp", then every registered context-parallel kind that runs on one group."""
    return TENSOR_PARALLEL + tuple(name for name, kind in ATTENTIONS.items() if len(kind.groups) == 1)


@dataclass(frozen=True)
class Config:
    """One block's sizes: ``world_size`` ranks, ``batch`` x ``seq`` tokens, ``hidden`` = heads x head_dim."""

    world_size: int = 4
    seq: int = 4096
    batch: int = 1
    hidden: int = 1024
    heads: int = 16
    dtype: torch.dtype = torch.bfloat16
    device: str = "meta"

    def tensor(self, *shape: int, rank: int) -> torch.Tensor:
        """A leaf tensor of this rank's own (random values, or none on meta)."""
        if self.device == "meta":
            return torch.empty(shape, dtype=self.dtype, device="meta", requires_grad=True)
        g = torch.Generator().manual_seed(rank)
        return torch.randn(shape, generator=g, dtype=torch.float64).to(self.dtype).requires_grad_()


def _block(comm: Comm, cfg: Config, dense: TransformerBlock, mode: str) -> None:
    block = ParallelTransformerBlock.from_dense(dense, comm, mode)
    seq = cfg.seq // comm.world_size if mode == "tp_sp" else cfg.seq
    block(cfg.tensor(cfg.batch, seq, cfg.hidden, rank=comm.rank)).float().sum().backward()
    with comm.phase("grad_sync"):
        sync_sequence_parallel_grads(block, comm)


def _context_parallel(comm: Comm, cfg: Config, parameters: int, attention: str) -> None:
    shape = (cfg.batch, cfg.heads, cfg.seq // comm.world_size, cfg.hidden // cfg.heads)
    q, k, v = (cfg.tensor(*shape, rank=comm.rank) for _ in range(3))
    ulysses, ring = context_groups(comm, attention)
    attention_kind(attention).attend(q, k, v, ulysses=ulysses, ring=ring, causal=True,
                                     layout="zigzag").float().sum().backward()
    with comm.phase("grad_sync"), comm.scope("weight_grads"):  # the block's weights are replicated over the group
        comm.all_reduce(torch.zeros(parameters, dtype=cfg.dtype, device=cfg.device))


def record(method: str, cfg: Config) -> CommTrace:
    """The trace (with FLOPs) of one forward, backward and gradient reduction of ``method`` on ``cfg.world_size`` ranks.

    A ``ValueError`` with the numbers if the sizes do not divide (raised here or by the method itself).
    """
    p = cfg.world_size
    if method not in all_methods():
        raise ValueError(f"unknown method {method!r}; methods are {all_methods()}")
    if cfg.hidden % cfg.heads:
        raise ValueError(f"hidden={cfg.hidden} is not divisible by heads={cfg.heads}")
    if method != "tp" and cfg.seq % p:
        raise ValueError(f"{method}: seq={cfg.seq} is not divisible by world_size={p}")
    with torch.device(cfg.device):
        dense = TransformerBlock(cfg.hidden, cfg.heads).to(cfg.dtype)
    if method in TENSOR_PARALLEL:
        return run(_block, cfg, dense, method, world_size=p, count_flops=True).trace
    parameters = sum(w.numel() for w in dense.parameters())
    return run(_context_parallel, cfg, parameters, method, world_size=p, count_flops=True).trace


@dataclass(frozen=True)
class Point:
    """What one method costs per rank on one config, on ``hardware``: per micro-batch (forward + backward)
    and per optimizer step (the gradient reduction, phase "grad_sync")."""

    method: str
    world_size: int
    seq: int
    sent: float  # bytes sent per rank (mean over ranks): activation + grad_sync, one micro-batch and one reduction
    seconds: float  # forward + backward: time the busiest rank communicates (transfers posted together overlap)
    exposed: float  # of which not hidden behind compute (the rank waits)
    trace: CommTrace
    timeline: Timeline
    activation: float = 0.0  # bytes sent per rank, forward + backward: paid on every micro-batch
    grad_sync: float = 0.0  # bytes sent per rank reducing gradients: paid once per optimizer step
    grad_seconds: float = 0.0  # the busiest rank's gradient reduction, once per step (nothing after it hides it)

    def step_bytes(self, micro_batches: int) -> float:
        """Bytes one rank sends in an optimizer step of ``micro_batches``: N·activation + grad_sync."""
        return micro_batches * self.activation + self.grad_sync

    def step_exposed(self, micro_batches: int) -> float:
        """Seconds of communication one step of ``micro_batches`` exposes: N·exposed + grad_seconds."""
        return micro_batches * self.exposed + self.grad_seconds


def _phases(tl: Timeline, grad_sync: bool) -> Timeline:
    """``tl`` with the compute and either the gradient reduction's spans or the others'."""
    keep: tuple[Span, ...] = tuple(s for s in tl.spans if s.kind == "compute" or (s.phase == "grad_sync") == grad_sync)
    return Timeline(keep, tl.hardware)


def measure(method: str, cfg: Config, hw: Cluster | str) -> Point:
    """Record ``method`` on ``cfg`` and lay it out on ``hw``."""
    trace = record(method, cfg)
    tl = timeline(trace, hw)
    micro, step = _phases(tl, grad_sync=False), _phases(tl, grad_sync=True)
    return Point(method, cfg.world_size, cfg.seq, trace.mean_per_rank(),
                 max(micro.comm(r) for r in tl.ranks), max(micro.exposed(r) for r in tl.ranks), trace, tl,
                 activation=trace.mean_per_rank(phase=lambda phase: phase != "grad_sync"),
                 grad_sync=trace.mean_per_rank(phase="grad_sync"), grad_seconds=max(step.comm(r) for r in tl.ranks))


def sweep(cfg: Config, hw: Cluster | str, methods: Iterable[str] | None = None, world_sizes: Iterable[int] = (),
          seqs: Iterable[int] = (), progress: Callable[[list], Iterable] = iter) -> tuple[list[Point], list[str]]:
    """``measure`` each of ``methods`` (default: ``all_methods()``) on ``cfg``, or on ``cfg`` with each of
    ``world_sizes`` and then each of ``seqs``; ``progress`` wraps the list of runs (e.g. ``tqdm.tqdm``).
    Returns (points, why each combination whose sizes do not divide was skipped)."""
    cfgs = [replace(cfg, world_size=p) for p in world_sizes] + [replace(cfg, seq=s) for s in seqs]
    points, skipped = [], []
    methods = all_methods() if methods is None else tuple(methods)
    for method, c in progress([(m, c) for c in (cfgs or [cfg]) for m in methods]):
        try:
            points.append(measure(method, c, hw))
        except ValueError as error:
            skipped.append(f"{method} on {c.world_size} ranks, seq {c.seq}: {error}")
    return points, skipped


def table(points: Iterable[Point], hw: Cluster | str, fmt: str = "markdown") -> str:
    """The points' bytes and predicted seconds per rank on ``hw``, per micro-batch (activations, forward +
    backward) and per optimizer step (the gradient reduction): "markdown" (default), "text" or "html"."""
    rows = [(p.method, str(p.world_size), str(p.seq), format_bytes(p.activation), format_seconds(p.seconds),
             format_seconds(p.exposed), format_bytes(p.grad_sync), format_seconds(p.grad_seconds)) for p in points]
    header = ("method", "ranks", "seq", "activations/micro-batch", f"comm time ({cluster(hw).name})", "exposed",
              "gradients/step", "gradient time")
    return Table(header, rows, frozenset(header[1:])).render(fmt)
