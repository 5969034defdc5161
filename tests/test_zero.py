"""ZeRO-1 and ZeRO-2 over DistributedDataParallel: exact AdamW training, 2Ψ(p−1)/p bytes per step, and the
memory each rank really holds equal to the ZeRO paper's closed forms (in float64: 8 bytes per weight and
gradient, 16 of AdamW state per parameter, plus AdamW's 4-byte step counter per tensor it steps)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import tpsp_sim as ts
from dp_cases import assert_same_parameters, batches, mean_loss, tiny_llama, train_dense, train_rank

STEP_COUNTER = 4  # AdamW's "step": a float32 scalar per parameter tensor it updates


@pytest.mark.parametrize("stage, p, cap", [(1, 3, 0.002), (2, 2, 25), pytest.param(1, 2, 25, marks=pytest.mark.slow),
                                           pytest.param(2, 3, 0.002, marks=pytest.mark.slow)])
def test_zero_training_with_accumulation_equals_dense(stage, p, cap):
    model, data = tiny_llama(), batches(steps=2, micro=2, batch=p)
    res = ts.run(train_rank, model, data, f"zero{stage}", cap, world_size=p)
    want = train_dense(model, data)
    for params, _ in res.outputs:
        assert_same_parameters(params, want)


@pytest.mark.parametrize("p", [2, 3, 4])
def test_memory_per_rank_is_the_closed_form_of_each_stage(p):
    model, data = tiny_llama(n_layers=1), batches(steps=1, micro=1, batch=p)
    n = sum(q.numel() for q in model.parameters())
    tensors = len(list(model.parameters()))
    n_pad = math.ceil(n / p) * p  # one bucket (25 MiB), padded to p equal shards
    for strategy, stage, elements, counters in [("ddp", 0, n, tensors), ("zero1", 1, n_pad, 1), ("zero2", 2, n_pad, 1)]:
        res = ts.run(train_rank, model, data, strategy, world_size=p)
        want = ts.zero_memory_per_rank(elements, p, stage, weight_bytes=8, grad_bytes=8, optimizer_bytes=16)
        for _, held in res.outputs:
            assert held == {"weights": want["weights"], "gradients": want["gradients"],
                            "optimizer": want["optimizer"] + STEP_COUNTER * counters}, strategy
    # what each stage saves, as the paper says: ZeRO-1 the optimizer state, ZeRO-2 the gradients too
    assert want["gradients"] == 8 * n_pad / p


@pytest.mark.parametrize("p, micro", [(2, 1), (3, 3), (4, 2)])
def test_bytes_per_step(p, micro):
    """ZeRO-1 (accumulating under no_sync): one reduce-scatter and one all-gather, 2Ψ(p−1)/p. ZeRO-2 reduce-
    scatters every micro-batch: (micro + 1)Ψ(p−1)/p, 2Ψ(p−1)/p with one micro-batch. Ψ: padded bytes."""
    model, data = tiny_llama(n_layers=1), batches(steps=1, micro=micro, batch=p)
    psi = math.ceil(sum(q.numel() for q in model.parameters()) / p) * p * 8
    one_pass = psi * (p - 1) // p  # one bucket: every call's bytes are whole
    for stage, passes in [(1, 2), (2, micro + 1)]:
        trace = ts.run(train_rank, model, data, f"zero{stage}", world_size=p).trace
        for r in range(p):
            assert trace.total(rank=r, phase="grad_sync", op="reduce_scatter") == (passes - 1) * one_pass
            assert trace.total(rank=r, phase="grad_sync", op="all_gather") == one_pass
            assert trace.total(rank=r, phase="grad_sync") == passes * one_pass
        if passes == 2:
            assert trace.total(rank=0, phase="grad_sync") == int(ts.zero_bytes_per_step(psi, p, stage))


def grads_after_backward(comm, model, rows, stage):
    ddp = ts.DistributedDataParallel(copy.deepcopy(model), comm)
    opt = ts.ZeroOptimizer(ddp, torch.optim.SGD, stage=stage, lr=1.0)
    mean_loss(ddp, rows.chunk(comm.world_size)[comm.rank]).backward()
    return [q.grad for q in ddp.parameters()], torch.cat([g for g in opt.grad_shards])


@pytest.mark.parametrize("stage", [1, 2])
def test_after_backward_only_reduced_shards_remain(stage):
    """No rank keeps a gradient it did not reduce: param.grad is None; the shards are the dense gradient's slices."""
    model, rows = tiny_llama(n_layers=1), batches(1, 1, 3)[0, 0]
    mean_loss(model, rows).backward()
    dense = torch.cat([q.grad.flatten() for q in model.parameters()][::-1])  # bucket order: last parameter first
    res = ts.run(grads_after_backward, model, rows, stage, world_size=3)
    shards = []
    for grads, shard in res.outputs:
        assert all(g is None for g in grads)
        shards.append(shard)
    torch.testing.assert_close(torch.cat(shards)[:dense.numel()], dense, rtol=0, atol=1e-12)


# ---- misuse ---------------------------------------------------------------------------------------

def step_without_reduction(comm, model, rows, stage):
    ddp = ts.DistributedDataParallel(copy.deepcopy(model), comm)
    opt = ts.ZeroOptimizer(ddp, torch.optim.AdamW, stage=stage, lr=1e-2)
    if stage == 1:
        with ddp.no_sync():
            mean_loss(ddp, rows).backward()
    opt.step()


@pytest.mark.parametrize("stage", [1, 2])
def test_a_step_before_the_reduction_fails_loudly(stage):
    model, rows = tiny_llama(n_layers=1), batches(1, 1, 2)[0, 0]
    with pytest.raises(ts.RankFailedError, match=rf"ZeroOptimizer.step \(ZeRO-{stage}\) before the gradients were reduced"):
        ts.run(step_without_reduction, model, rows, stage, world_size=2)


def no_sync_under_zero2(comm):
    ddp = ts.DistributedDataParallel(nn.Linear(4, 4), comm)
    ts.ZeroOptimizer(ddp, torch.optim.AdamW, stage=2)
    with ddp.no_sync():
        pass


def test_bad_stages_and_no_sync_under_zero2():
    with pytest.raises(ts.RankFailedError, match="no_sync\\(\\) cannot be used with ZeRO-2"):
        ts.run(no_sync_under_zero2, world_size=2)
    with pytest.raises(ts.RankFailedError, match="stage must be 1 or 2"):
        ts.run(lambda comm: ts.ZeroOptimizer(ts.DistributedDataParallel(nn.Linear(2, 2), comm), torch.optim.SGD,
                                             stage=3, lr=1), world_size=2)
    with pytest.raises(ValueError, match="wraps a ts.DistributedDataParallel"):
        ts.ZeroOptimizer(nn.Linear(2, 2), torch.optim.SGD, stage=1, lr=1)


def test_closed_forms():
    assert ts.zero_bytes_per_step(1000, 4, 0) == ts.zero_bytes_per_step(1000, 4, 2) == 1500
    assert ts.zero_bytes_per_step(1000, 4, 3) == 2250  # 1.5x plain data parallelism
    assert ts.zero_memory_per_rank(1e9, 64, 3) == {"weights": 2e9 / 64, "gradients": 2e9 / 64, "optimizer": 12e9 / 64}
    assert sum(ts.zero_memory_per_rank(1e9, 64, 0).values()) == 16e9  # ZeRO paper: 16Ψ bytes unsharded
    with pytest.raises(ValueError, match="ZeRO stage"):
        ts.zero_bytes_per_step(1, 2, 4)
    with pytest.raises(ValueError, match="positive int"):
        ts.zero_memory_per_rank(1, 0, 1)


def test_the_closed_forms_agree_with_the_memory_budget():
    """ts.memory.budget's ZeRO stages are these, with its master weights counted as optimizer state (as the
    ZeRO paper's 12 bytes do), in bf16 gradients (2 + 2 + 12) and Megatron's fp32 ones (2 + 4 + 12)."""
    for dp in (1, 8, 64):
        for stage in (0, 1, 2, 3):
            for grad_dtype, grad_bytes in (("bf16", 2), ("fp32", 4)):
                b = ts.memory.budget("llama3-8b", (dp, 1, 1), 8192, 1, zero=stage, grad_dtype=grad_dtype)
                mine = ts.zero_memory_per_rank(b.parameters, dp, stage, grad_bytes=grad_bytes)
                assert mine == pytest.approx({"weights": b.weights, "gradients": b.gradients,
                                              "optimizer": b.optimizer + b.master_weights})