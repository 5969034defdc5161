"""Shared cases of the data-parallel tests (DDP, ZeRO-1/2, FSDP): a tiny Llama in float64, its data,
the dense reference and one rank's training loop under each strategy."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import tpsp_sim as ts

VOCAB, D_MODEL, HEADS, KV_HEADS, D_FF, SEQ = 30, 16, 4, 2, 20, 6  # 30 rows: padded over 4 (and 7) ranks
LR = 1e-2
STRATEGIES = ("ddp", "zero1", "zero2", "fsdp")


def tiny_llama(n_layers: int = 2, seed: int = 0) -> ts.TinyLlama:
    torch.manual_seed(seed)
    return ts.TinyLlama(VOCAB, D_MODEL, n_layers, HEADS, KV_HEADS, D_FF).double()


def batches(steps: int, micro: int, batch: int, seed: int = 1) -> torch.Tensor:
    """[steps, micro, batch, SEQ + 1] token ids: every step's global batch, cut into micro-batches."""
    return torch.randint(0, VOCAB, (steps, micro, batch, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def mean_loss(model, rows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``rows`` ([batch, SEQ + 1])."""
    return F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())


def train_dense(model, data: torch.Tensor) -> dict[str, torch.Tensor]:
    """AdamW on the whole batch, the loss of each micro-batch divided by their count (gradient accumulation)."""
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for step in data:
        opt.zero_grad()
        for rows in step:
            (mean_loss(model, rows) / len(step)).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def shard_model(model, comm, strategy: str, bucket_cap_mb: float = 25, reshard_after_forward: bool = True):
    """(what to call forward on, the optimizer, the DDP wrapper or None) for ``strategy``; ``model`` is changed."""
    if strategy == "fsdp":
        for block in model.blocks:
            ts.fully_shard(block, comm, reshard_after_forward=reshard_after_forward)
        ts.fully_shard(model, comm)
        return model, torch.optim.AdamW(model.parameters(), lr=LR), None
    ddp = ts.DistributedDataParallel(model, comm, bucket_cap_mb=bucket_cap_mb)
    if strategy == "ddp":
        return ddp, torch.optim.AdamW(ddp.parameters(), lr=LR), ddp
    return ddp, ts.ZeroOptimizer(ddp, torch.optim.AdamW, stage=int(strategy[-1]), lr=LR), ddp


def full_parameters(model) -> dict[str, torch.Tensor]:
    """The whole parameters by dense name (FSDP modules all-gathered first)."""
    for m in model.modules():
        if isinstance(m, ts.FSDPModule):
            m.unshard()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_rank(comm, model, data, strategy, bucket_cap_mb=25, accumulate_locally=True):
    """One rank's training: its 1/p of every micro-batch, gradients accumulated over the micro-batches
    (under no_sync for DDP and ZeRO-1 when ``accumulate_locally``; FSDP: set_requires_gradient_sync)."""
    model = copy.deepcopy(model)
    net, opt, ddp = shard_model(model, comm, strategy, bucket_cap_mb)
    p, r = comm.world_size, comm.rank
    held = None
    for step in data:
        opt.zero_grad()
        for m, rows in enumerate(step):
            last = m == len(step) - 1
            local = accumulate_locally and not last
            if strategy == "fsdp":
                net.set_requires_gradient_sync(not local)
            ctx = ddp.no_sync() if local and strategy in ("ddp", "zero1") else nullcontext()
            with ctx:
                (mean_loss(net, rows.chunk(p)[r]) / len(step)).backward()
        opt.step()
        held = ts.held_bytes(model, opt)
    return full_parameters(model), held


def assert_same_parameters(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-10) -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=atol, msg=name)
