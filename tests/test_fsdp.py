"""fully_shard (FSDP2 / ZeRO-3): exact AdamW training, the all-gathers and reduce-scatter of every block
(3Ψ(p−1)/p per step, 2Ψ(p−1)/p for the root and for reshard_after_forward=False), shards padded as
FSDP2 pads them, and the memory each rank really holds, at rest and in the middle of a forward."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import tpsp_sim as ts
from dp_cases import (assert_same_parameters, batches, mean_loss, shard_model, tiny_llama, train_dense,
                      train_rank)


def padded_elements(module: nn.Module, p: int, skip=()) -> int:
    """Elements of ``module``'s parameters once each is padded to p·ceil(d0/p) rows (FSDP2's padding)."""
    return sum(math.ceil(q.shape[0] / p) * p * q[0].numel() for n, q in module.named_parameters()
               if not n.startswith(skip))


@pytest.mark.parametrize("p, locally", [(7, True), (3, False), pytest.param(2, True, marks=pytest.mark.slow)])  # 7: empty shards
def test_fsdp_training_with_accumulation_equals_dense(p, locally):
    model, data = tiny_llama(), batches(steps=2, micro=2, batch=p)
    res = ts.run(train_rank, model, data, "fsdp", 25, locally, world_size=p)
    want = train_dense(model, data)
    for params, _ in res.outputs:
        assert_same_parameters(params, want)


def one_step(comm, model, rows, reshard_after_forward):
    model = copy.deepcopy(model)
    net, opt, _ = shard_model(model, comm, "fsdp", reshard_after_forward=reshard_after_forward)
    seen = {}
    last = model.blocks[-1]
    last.register_forward_pre_hook(lambda *_: seen.update(in_forward=ts.held_bytes(model)["weights"]))
    mean_loss(net, rows.chunk(comm.world_size)[comm.rank]).backward()
    opt.step()
    shapes = {n: tuple(q.shape) for n, q in model.named_parameters()}
    return seen["in_forward"], ts.held_bytes(model, opt), shapes


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_bytes_and_memory_per_rank(p, reshard_after_forward):
    model, rows = tiny_llama(n_layers=3), batches(1, 1, p)[0, 0]
    res = ts.run(one_step, model, rows, reshard_after_forward, world_size=p)
    blocks = [padded_elements(b, p) * 8 for b in model.blocks]
    root = padded_elements(model, p, skip="blocks.") * 8
    passes = 3 if reshard_after_forward else 2
    for r in range(p):
        for i, psi in enumerate(blocks):  # one all-gather in forward, one in backward, one reduce-scatter
            assert res.trace.total(rank=r, scope=f"fsdp/blocks.{i}") == passes * (psi * (p - 1) // p)
            assert res.trace.count(rank=r, scope=f"fsdp/blocks.{i}", op="reduce_scatter", phase="grad_sync") == 1
        assert res.trace.total(rank=r, scope="fsdp/root") == 2 * (root * (p - 1) // p)  # the root is kept
    psi = sum(blocks) + root
    if reshard_after_forward and all(b * (p - 1) % p == 0 for b in blocks):
        assert res.trace.total(rank=0, scope=lambda s: s.startswith("fsdp/blocks.")) == ts.zero_bytes_per_step(sum(blocks), p, 3)
    n_pad = psi // 8
    want = ts.zero_memory_per_rank(n_pad, p, 3, weight_bytes=8, grad_bytes=8, optimizer_bytes=16)
    tensors = len(list(model.parameters()))
    full = {n: tuple(q.shape) for n, q in model.named_parameters()}
    for r, (in_forward, held, shapes) in enumerate(res.outputs):
        assert held["weights"] == want["weights"] and held["gradients"] == want["gradients"]
        local = sum(math.prod(s) for s in shapes.values())
        assert held["optimizer"] == 16 * local + 4 * tensors
        if r == 0:  # rank 0 holds ceil(d0/p) rows of every parameter: the closed form exactly
            assert held["optimizer"] == want["optimizer"] + 4 * tensors
        # torch.chunk's rows: rank r keeps [r·c, min((r+1)·c, d0)), c = ceil(d0/p)
        for n, shape in full.items():
            c = math.ceil(shape[0] / p)
            assert shapes[n] == (max(0, min(c, shape[0] - r * c)), *shape[1:])
        # as the last block's forward starts: every shard, the root's weights and that block's whole; the earlier
        # blocks' freed (reshard_after_forward) or still there
        whole = sum(q.numel() for q in model.parameters() if not any(q is b for b in model.blocks.parameters()))
        kept = model.blocks if not reshard_after_forward else model.blocks[-1:]
        whole += sum(q.numel() for b in kept for q in b.parameters())
        assert in_forward == want["weights"] + 8 * whole


def test_padding_and_empty_shards():
    """30 rows over 7 ranks: c = 5, ranks 0-5 hold 5 rows, rank 6 none, and each all-gather sends 5 rows."""
    model, rows = tiny_llama(n_layers=1), batches(1, 1, 7)[0, 0]
    res = ts.run(one_step, model, rows, True, world_size=7)
    assert [out[2]["embed.weight"] for out in res.outputs] == [(5, 16)] * 6 + [(0, 16)]
    assert {e.shape for e in res.trace.events if e.scope == "fsdp/root" and e.op == "all_gather"} == {
        (padded_elements(model, 7, skip="blocks.") // 7,)}


def gradients_of_a_block(comm, block, x, reshard_after_forward):
    block = copy.deepcopy(block)
    ts.fully_shard(block, comm, reshard_after_forward=reshard_after_forward)
    y = block(x.chunk(comm.world_size)[comm.rank])
    (y * y).sum().backward()
    grads = {n: q.grad.clone() for n, q in block.named_parameters()}  # the shards' gradients
    return y.detach(), grads


def test_sharded_gradients_are_the_averaged_dense_gradient_rows():
    block = ts.LlamaBlock(16, 4, 2, 20).double()
    x = torch.randn(6, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = block(x)
    (y * y).sum().backward()
    res = ts.run(gradients_of_a_block, block, x, True, world_size=3)
    torch.testing.assert_close(torch.cat([out[0] for out in res.outputs]), y.detach(), rtol=0, atol=1e-12)
    for name, q in block.named_parameters():
        c = math.ceil(q.shape[0] / 3)
        for r, (_, grads) in enumerate(res.outputs):  # "avg" over 3 ranks of the per-rank sum-of-squares loss
            torch.testing.assert_close(grads[name] * 3, q.grad[r * c:(r + 1) * c], rtol=0, atol=1e-12, msg=name)


def test_trace_order_of_one_step():
    """Forward: blocks' all-gathers in order; backward: each block all-gathered, then reduce-scattered, last first."""
    model, rows = tiny_llama(n_layers=2), batches(1, 1, 2)[0, 0]
    trace = ts.run(one_step, model, rows, True, world_size=2).trace
    calls = [(e.op, e.scope, e.phase) for e in trace.events if e.rank == 0]
    assert calls == [
        ("all_gather", "fsdp/root", "forward"), ("all_gather", "fsdp/blocks.0", "forward"),
        ("all_gather", "fsdp/blocks.1", "forward"),
        ("all_gather", "fsdp/blocks.1", "backward"), ("reduce_scatter", "fsdp/blocks.1", "grad_sync"),
        ("all_gather", "fsdp/blocks.0", "backward"), ("reduce_scatter", "fsdp/blocks.0", "grad_sync"),
        ("reduce_scatter", "fsdp/root", "grad_sync")]


# ---- misuse ---------------------------------------------------------------------------------------

class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2).double(), nn.Linear(2, 2).float()


def test_bad_modules_and_meshes():
    with pytest.raises(ts.RankFailedError, match="no parameters"):
        ts.run(lambda comm: ts.fully_shard(nn.ReLU(), comm), world_size=2)
    with pytest.raises(ts.RankFailedError, match="does not include the calling rank"):
        ts.run(lambda comm: ts.fully_shard(nn.Linear(2, 2), comm.new_group([1])), world_size=2)
    with pytest.raises(ts.RankFailedError, match=r"1-D mesh or a Comm.*mesh\[\('dp', 'cp'\)\]"):
        ts.run(lambda comm: ts.fully_shard(nn.Linear(2, 2), ts.init_device_mesh(comm, (2, 2), mesh_dim_names=(
            "dp", "cp"))), world_size=4)
    with pytest.raises(ts.RankFailedError, match="called twice"):
        ts.run(lambda comm: ts.fully_shard(ts.fully_shard(nn.Linear(2, 2), comm), comm), world_size=2)
    with pytest.raises(ts.RankFailedError, match="one dtype per module"):
        ts.run(lambda comm: ts.fully_shard(Mixed(), comm), world_size=2)
    with pytest.raises(ts.RankFailedError, match="reshard_after_forward must be True or False"):
        ts.run(lambda comm: ts.fully_shard(nn.Linear(2, 2), comm, reshard_after_forward=2), world_size=2)


def test_a_one_dim_mesh_is_its_group():
    def fn(comm):
        lin = ts.fully_shard(nn.Linear(4, 2).double(), ts.init_device_mesh(comm, (2,), mesh_dim_names=("dp",)))
        return tuple(lin.weight.shape)
    assert ts.run(fn, world_size=2).outputs == [(1, 4), (1, 4)]


# ---- prefetch ---------------------------------------------------------------------------------------

def _call(op, seq, seconds, scope, phase):
    return ts.CommEvent(op, 0, (0, 1), (seconds,), torch.float64, seconds, seconds, seconds, scope, phase, seq)


def test_prefetch_by_hand():
    """All-gather a (2 s), 1 s of compute, all-gather b (2 s), 1 s, reduce-scatter (1 s), 1 s. Without prefetch
    the rank waits 2 + 2 s and ends at 7; prefetching b right after a (2-4, under the compute) waits 2 + 1 s, ends at 6."""
    trace = ts.CommTrace(
        events=[_call("all_gather", 0, 2, "fsdp/a", "forward"), _call("all_gather", 2, 2, "fsdp/b", "forward"),
                _call("reduce_scatter", 4, 1, "fsdp/b", "grad_sync")],
        compute=[ts.ComputeSpan(0, s, 10, "", "forward") for s in (1, 3, 5)], world_size=1)
    for prefetch, waits, end in ((False, [2, 2, 0], 7), (True, [2, 1, 0], 6)):
        calls, done = ts.fsdp_prefetch_overlap(trace, 0, flops_per_second=10, seconds=lambda e: e.nbytes,
                                               prefetch=prefetch)
        assert [c.exposed for c in calls] == waits and done == end
        assert [c.scope for c in calls] == ["fsdp/a", "fsdp/b", "fsdp/b"]


def test_prefetch_of_a_real_step_hides_all_gathers():
    model, rows = tiny_llama(n_layers=3), batches(1, 1, 2)[0, 0]
    trace = ts.run(one_step, model, rows, True, world_size=2, count_flops=True).trace
    hw = ts.cost.Hardware("slow", link_bandwidth=1e9, latency=5e-6, peak_flops=1e9)
    exposed = {}
    for prefetch in (False, True):
        calls, end = ts.fsdp_prefetch_overlap(trace, 0, flops_per_second=1e9, seconds=lambda e: ts.cost.event_time(e, hw),
                                              prefetch=prefetch)
        assert len(calls) == trace.count(rank=0)
        exposed[prefetch] = sum(c.exposed for c in calls if c.op == "all_gather")
    assert exposed[True] < exposed[False] / 2


def frozen_bias(comm, model, x):
    net = copy.deepcopy(model)
    ts.fully_shard(net[0], comm)
    ts.fully_shard(net, comm)
    net(x.chunk(comm.world_size)[comm.rank]).sum().backward()
    return {n: p.grad for n, p in net.named_parameters()}


def test_a_frozen_parameter_is_sharded_and_gets_no_gradient():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3)).double()
    model[0].bias.requires_grad_(False)
    x = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    model(x).sum().backward()
    for r, grads in enumerate(ts.run(frozen_bias, model, x, world_size=2).outputs):
        assert grads["0.bias"] is None
        torch.testing.assert_close(grads["0.weight"] * 2, model[0].weight.grad[3 * r:3 * r + 3], rtol=0, atol=1e-12)
