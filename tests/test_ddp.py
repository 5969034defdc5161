"""DistributedDataParallel: bucketed all-reduces during backward, exact against the dense model, in
reverse layer order, 2Ψ(p−1)/p bytes per step whatever the micro-batches, and misuse that fails loudly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tpsp_sim as ts
from dp_cases import batches, mean_loss, tiny_llama, train_dense, train_rank, assert_same_parameters


@pytest.mark.parametrize("p, micro, cap", [(3, 3, 0.001), pytest.param(2, 2, 25, marks=pytest.mark.slow),
                                           pytest.param(4, 1, 0.002, marks=pytest.mark.slow)])
def test_ddp_training_with_accumulation_equals_dense(p, micro, cap):
    model, data = tiny_llama(), batches(steps=2, micro=micro, batch=p)
    want = train_dense(model, data)
    res = ts.run(train_rank, model, data, "ddp", cap, world_size=p)
    for params, _ in res.outputs:
        assert_same_parameters(params, want)


def gradients_after_one_backward(comm, model, rows, cap):
    ddp = ts.DistributedDataParallel(copy.deepcopy(model), comm, bucket_cap_mb=cap)
    mean_loss(ddp, rows.chunk(comm.world_size)[comm.rank]).backward()
    return {n: p.grad.clone() for n, p in ddp.module.named_parameters()}, [b.names for b in ddp.buckets]


def test_gradients_are_the_dense_gradients_and_buckets_go_last_layer_first():
    model, rows = tiny_llama(), batches(1, 1, 6)[0, 0]
    mean_loss(model, rows).backward()
    res = ts.run(gradients_after_one_backward, model, rows, 0.001, world_size=3)
    names = [n for n, _ in model.named_parameters()]
    for grads, buckets in res.outputs:
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=1e-12, msg=n)
        flat = [n for b in buckets for n in b]
        assert flat == names[::-1]  # reverse definition order, every parameter once
        assert len(buckets) > 2
        # 0.001 MiB = 1048.576 bytes: a bucket closes once it holds that much (its last parameter may pass it)
        sizes = {n: p.numel() * 8 for n, p in model.named_parameters()}
        assert all(sum(sizes[n] for n in b[:-1]) < 1048.576 for b in buckets)
    # buckets reduced in bucket order, recorded during backward with phase grad_sync
    ar = [e for e in res.trace.events if e.rank == 0 and e.op == "all_reduce"]
    assert [e.scope for e in ar] == [f"dp_grads/bucket{i}" for i in range(len(ar))]
    assert {e.phase for e in ar} == {"grad_sync"}


def test_buckets_are_reduced_while_backward_still_computes():
    """The first bucket (the head's gradient) is all-reduced before the backward of the blocks runs."""
    model, rows = tiny_llama(), batches(1, 1, 4)[0, 0]
    res = ts.run(gradients_after_one_backward, model, rows, 0.001, world_size=2, count_flops=True)
    program = res.trace.programs()[0]
    first = next(i for i, x in enumerate(program) if isinstance(x, ts.CommEvent) and x.phase == "grad_sync")
    after = [x for x in program[first:] if isinstance(x, ts.ComputeSpan) and x.phase == "backward"]
    before = [x for x in program[:first] if isinstance(x, ts.ComputeSpan) and x.phase == "backward"]
    assert before and sum(x.flops for x in after) > sum(x.flops for x in before)


@pytest.mark.parametrize("p", [2, 3, 5])
def test_bytes_per_step_are_one_all_reduce_whatever_the_micro_batches(p):
    model, data = tiny_llama(n_layers=1), batches(steps=1, micro=3, batch=p)
    res = ts.run(train_rank, model, data, "ddp", world_size=p)
    psi = sum(q.numel() for q in model.parameters()) * 8
    for r in range(p):  # one bucket (25 MiB), one all-reduce: its bytes are floored to whole bytes
        assert res.trace.count(rank=r, phase="grad_sync") == 1
        assert res.trace.total(rank=r, phase="grad_sync") == int(ts.zero_bytes_per_step(psi, p, 0))
        assert res.trace.total(rank=r, phase="grad_sync") == 2 * psi * (p - 1) // p
    # the replicas start from rank 0's weights: one broadcast per bucket at construction
    assert res.trace.count(op="broadcast", scope="ddp_init") == p


def test_without_no_sync_every_micro_batch_is_reduced_and_the_result_is_the_same():
    model, data = tiny_llama(n_layers=1), batches(steps=2, micro=2, batch=2)
    res = ts.run(train_rank, model, data, "ddp", 25, False, world_size=2)
    assert_same_parameters(res.outputs[0][0], train_dense(model, data))
    psi = sum(q.numel() for q in model.parameters()) * 8
    assert res.trace.total(rank=0, phase="grad_sync") == 2 * 2 * 2 * psi / 2  # 2 steps x 2 micro-batches


# ---- misuse ---------------------------------------------------------------------------------------

def forget_the_final_reduction(comm, model, rows):
    ddp = ts.DistributedDataParallel(copy.deepcopy(model), comm)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    for _ in range(2):
        with ddp.no_sync():  # every micro-batch, the last one too: nothing is ever reduced
            mean_loss(ddp, rows).backward()
        opt.step()
        opt.zero_grad()


def test_stepping_on_gradients_never_reduced_fails_loudly():
    model, rows = tiny_llama(n_layers=1), batches(1, 1, 2)[0, 0]
    with pytest.raises(ts.RankFailedError, match="never reduced.*no_sync"):
        ts.run(forget_the_final_reduction, model, rows, world_size=2)


def two_forwards_then_backward(comm, model, rows):
    ddp = ts.DistributedDataParallel(copy.deepcopy(model), comm)
    loss = mean_loss(ddp, rows)
    loss = loss + mean_loss(ddp, rows)  # the first forward's reduction is still pending
    loss.backward()


def test_a_second_forward_before_the_reduction_is_an_error():
    model, rows = tiny_llama(n_layers=1), batches(1, 1, 2)[0, 0]
    with pytest.raises(ts.RankFailedError, match="forward called again before"):
        ts.run(two_forwards_then_backward, model, rows, world_size=2)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(3, 3).double(), nn.Linear(3, 3).double()

    def forward(self, x):
        return self.used(x)


def unused_parameter(comm):
    ddp = ts.DistributedDataParallel(TwoHeads(), comm)
    ddp(torch.ones(2, 3, dtype=torch.float64)).sum().backward()


def test_a_parameter_without_gradient_is_named_not_left_unreduced():
    with pytest.raises(ts.RankFailedError, match=r"got no gradient \(unused.bias, unused.weight\)"):
        ts.run(unused_parameter, world_size=2)


def test_bad_modules_and_groups():
    with pytest.raises(ts.RankFailedError, match="no parameter that requires a gradient"):
        ts.run(lambda comm: ts.DistributedDataParallel(nn.ReLU(), comm), world_size=2)
    with pytest.raises(ts.RankFailedError, match="does not include the calling rank"):
        ts.run(lambda comm: ts.DistributedDataParallel(nn.Linear(2, 2), comm.new_group([0])), world_size=2)
    with pytest.raises(ts.RankFailedError, match="bucket_cap_mb must be a positive"):
        ts.run(lambda comm: ts.DistributedDataParallel(nn.Linear(2, 2), comm, bucket_cap_mb=0), world_size=2)


# ---- the buckets on their own stream --------------------------------------------------------------

def _event(seq, nbytes, scope, phase="grad_sync"):
    return ts.CommEvent("all_reduce", 0, (0, 1), (nbytes,), torch.float64, nbytes, nbytes, nbytes, scope, phase, seq)


def test_grad_sync_overlap_by_hand():
    """10 FLOP at 10 FLOP/s = 1 s of compute, bucket a (3 s), 1 s, bucket b (1 s), 0.5 s, a blocking 2 s call:
    a runs 1-4, b waits for it and runs 4-5; the rank is busy until 4.5, so a is hidden and b exposed 0.5 s."""
    trace = ts.CommTrace(events=[_event(1, 3, "a"), _event(3, 1, "b"), _event(5, 2, "tp", phase="backward")],
                         compute=[ts.ComputeSpan(0, 0, 10, "", "backward"), ts.ComputeSpan(0, 2, 10, "", "backward"),
                                  ts.ComputeSpan(0, 4, 5, "", "backward")], world_size=1)
    buckets, compute_end = ts.grad_sync_overlap(trace, 0, flops_per_second=10, seconds=lambda e: e.nbytes)
    assert compute_end == 4.5  # 2.5 s of compute and the blocking 2 s call
    assert [(b.scope, b.op, b.launched, b.start, b.end) for b in buckets] == [("a", "all_reduce", 1, 1, 4),
                                                                             ("b", "all_reduce", 2, 4, 5)]
    assert [b.exposed for b in buckets] == [0, 0.5]


def test_grad_sync_overlap_of_a_real_backward():
    model, rows = tiny_llama(), batches(1, 1, 4)[0, 0]
    trace = ts.run(gradients_after_one_backward, model, rows, 0.001, world_size=2, count_flops=True).trace
    hw = ts.cost.hardware("h100-nvlink")
    buckets, end = ts.grad_sync_overlap(trace, 1, flops_per_second=1e9, seconds=lambda e: ts.cost.event_time(e, hw))
    assert len(buckets) == trace.count(rank=1, phase="grad_sync") > 2
    assert buckets[0].launched < end and all(a.end <= b.start for a, b in zip(buckets, buckets[1:]))
    assert sum(b.exposed for b in buckets) == pytest.approx(max(0.0, buckets[-1].end - end))
    with pytest.raises(ValueError, match="rank 5 recorded nothing"):
        ts.grad_sync_overlap(trace, 5, flops_per_second=1e9, seconds=lambda e: 0.0)
