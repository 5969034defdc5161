"""Training end to end under each data-parallel strategy, and FSDP composed with TP+SP and context
parallelism on a (dp, cp, tp) mesh (torchtitan's layout: FSDP over the flattened dp × cp), against the
dense model in float64 to 1e-10; and a step of each strategy on gloo processes with the simulator's trace."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import tpsp_sim as ts
from dp_cases import LR, STRATEGIES, assert_same_parameters, batches, tiny_llama, train_dense, train_rank


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("p", [2, 3])
def test_twenty_adamw_steps_with_four_micro_batches_equal_dense(strategy, p):
    model, data = tiny_llama(), batches(steps=20, micro=4, batch=p)
    want = train_dense(model, data)
    res = ts.run(train_rank, model, data, strategy, 0.002, world_size=p)
    for params, _ in res.outputs:
        assert_same_parameters(params, want)
    assert max((want[n] - q).abs().max() for n, q in model.named_parameters()) > 1e-2  # it moved


# ---- FSDP over dp × cp, TP+SP inside --------------------------------------------------------------

MESH = ("dp", "cp", "tp")


def hybrid_rank(comm, model, data, shape, attention, strategy="fsdp"):
    """torchtitan's order: TP+SP and CP build the parallel model, then fully_shard each block and the root
    over the flattened dp × cp group (or DDP over it); the sequence-parallel weights' gradients are summed
    over tp."""
    mesh = ts.init_device_mesh(comm, shape, mesh_dim_names=MESH)
    tp, cp, dp_cp = mesh["tp"], mesh["cp"], mesh["dp", "cp"]
    par = ts.ParallelTinyLlama.from_dense(model, tp=tp, cp=cp, attention=attention, layout="zigzag")
    if strategy == "fsdp":
        for block in par.blocks:
            ts.fully_shard(block, dp_cp)
        net = ts.fully_shard(par, dp_cp)
    else:
        net = ts.DistributedDataParallel(par, dp_cp, bucket_cap_mb=0.01)
    opt = torch.optim.AdamW(net.parameters(), lr=LR)
    for step in data:
        rows = step.flatten(0, 1).chunk(mesh.size("dp"))[mesh.get_local_rank("dp")]
        tokens, targets = (ts.shard_hybrid(t, tp, cp, attention, "zigzag") for t in (rows[:, :-1], rows[:, 1:]))
        opt.zero_grad()
        logits = net(tokens)  # ParallelTinyLlama.loss, through the wrapper: its replica's share of the mean
        F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").div(targets.numel() * tp.world_size
                                                                                       ).backward()
        ts.sync_sequence_parallel_grads(par, tp)
        opt.step()
    for m in par.modules():
        if isinstance(m, ts.FSDPModule):
            m.unshard()
    return ts.gather_dense_parameters(par, tp)


def hybrid_model():
    torch.manual_seed(0)
    return ts.TinyLlama(32, d_model=32, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=64).double()


def hybrid_data(steps, batch, seq=16):
    return torch.randint(0, 32, (steps, 1, batch, seq + 1), generator=torch.Generator().manual_seed(5))


def dense_llama_steps(model, data):
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for step in data:
        rows = step.flatten(0, 1)
        opt.zero_grad()
        model.loss(rows[:, :-1], rows[:, 1:]).backward()
        opt.step()
    return {n: q.detach() for n, q in model.named_parameters()}


@pytest.mark.parametrize("shape, attention, steps", [((2, 2, 2), "ring", 2), ((3, 2, 2), "ulysses", 1)])
def test_fsdp_over_dp_cp_with_tp_sp_equals_dense(shape, attention, steps):
    model, data = hybrid_model(), hybrid_data(steps, batch=shape[0])  # dp = 3: six FSDP shards, padded
    res = ts.run(hybrid_rank, model, data, shape, attention, world_size=int(torch.tensor(shape).prod()))
    want = dense_llama_steps(model, data)
    for params in res.outputs:
        assert_same_parameters(params, want)
    # the FSDP collectives run on the dp × cp groups only
    assert {e.axis for e in res.trace.events if e.scope.startswith("fsdp/")} == {"dp_cp"}


def test_ddp_over_dp_cp_with_tp_sp_equals_dense():
    model, data = hybrid_model(), hybrid_data(2, batch=2)
    res = ts.run(hybrid_rank, model, data, (2, 2, 2), "ring", "ddp", world_size=8)
    want = dense_llama_steps(model, data)
    for params in res.outputs:
        assert_same_parameters(params, want)
    assert {e.axis for e in res.trace.events if e.scope.startswith("dp_grads/")} == {"dp_cp"}


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["ring", "ulysses"])
def test_twenty_steps_of_fsdp_over_dp_cp_with_tp_sp(attention):
    model, data = hybrid_model(), hybrid_data(20, batch=4)
    res = ts.run(hybrid_rank, model, data, (2, 2, 2), attention, world_size=8)
    want = dense_llama_steps(model, data)
    for params in res.outputs:
        assert_same_parameters(params, want)


# ---- the same on real torch.distributed -----------------------------------------------------------

def every_strategy(comm, model, data):
    """One step (two micro-batches) under DDP, ZeRO-1, ZeRO-2 and FSDP on any backend: the weights of each."""
    return {strategy: train_rank(comm, model, data, strategy, 0.002)[0] for strategy in STRATEGIES}


@pytest.mark.real
@pytest.mark.timeout(180)
def test_every_strategy_on_gloo_has_the_simulators_trace():
    model, data = tiny_llama(), batches(steps=1, micro=2, batch=2)
    sim = ts.run(every_strategy, model, data, world_size=2)
    real = ts.run(every_strategy, model, data, world_size=2, backend="gloo")
    assert real.trace.events == sim.trace.events
    assert {e.op for e in real.trace.events} == {"broadcast", "all_reduce", "all_gather", "reduce_scatter"}
    want = train_dense(model, data)
    for got, expected in zip(real.outputs, sim.outputs):
        for strategy in STRATEGIES:
            assert_same_parameters(got[strategy], expected[strategy], atol=1e-12)
            assert_same_parameters(got[strategy], want)
