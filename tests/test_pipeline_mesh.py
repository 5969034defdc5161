"""Pipeline parallelism as the fourth mesh axis: (pp, dp, cp, tp) in Megatron's order, a pipeline of hybrid
TP+SP × ring-attention stages exact against the dense tiny Llama on 16 virtual ranks, pp in the per-axis views."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tpsp_sim as ts
from tpsp_sim.pipeline import stage_module
from tpsp_sim.viz.plot import comm_bars

NAMES = ("pp", "dp", "cp", "tp")
VOCAB, SEQ, LAYERS = 16, 8, 4


def test_four_axes_in_megatrons_order_tp_fastest_pp_slowest():
    shape = (2, 2, 2, 2)

    def fn(comm):
        mesh = ts.init_device_mesh(comm, shape, mesh_dim_names=NAMES)
        sub = mesh.submesh("dp", "cp", "tp")
        return (mesh.coordinate, mesh["pp"].group, mesh["tp"].group, mesh["dp", "cp"].group, sub.coordinate,
                sub["dp", "cp"].group, sub.comm.group)

    res = ts.run(fn, world_size=16)
    for rank, (coord, pp, tp, dp_cp, sub_coord, sub_dp_cp, sub_group) in enumerate(res.outputs):
        p, d, c, t = coord
        assert rank == ((p * 2 + d) * 2 + c) * 2 + t
        assert pp == (rank % 8, rank % 8 + 8) and tp == (rank - t, rank - t + 1)
        assert sub_coord == (d, c, t) and sub_dp_cp == dp_cp
        assert sub_group == tuple(range(8 * p, 8 * p + 8))  # this stage's (dp, cp, tp) grid


def test_submesh_needs_axes_in_mesh_order():
    def fn(comm):
        ts.init_device_mesh(comm, (2, 1), mesh_dim_names=("pp", "tp")).submesh("tp", "pp")

    with pytest.raises(ValueError, match=r"submesh needs distinct axes of \('pp', 'tp'\) in mesh order"):
        ts.run(fn, world_size=2)


def model_and_batches(steps: int, batch: int):
    torch.manual_seed(0)
    model = ts.TinyLlama(VOCAB, d_model=16, n_layers=LAYERS, n_heads=4, n_kv_heads=2, d_ff=24).double()
    gen = torch.Generator().manual_seed(1)
    return model, torch.randint(0, VOCAB, (steps, batch, SEQ + 1), generator=gen)


def pipeline_rank(comm, model, data, shape, m, lr):
    """One rank: its stage of the hybrid model, its dp slice and tokens; 1F1B over m micro-batches per step."""
    mesh = ts.init_device_mesh(comm, shape, mesh_dim_names=NAMES)
    grid, pp = mesh.submesh("dp", "cp", "tp"), mesh["pp"]
    tp, cp = mesh["tp"], mesh["cp"]
    par = ts.ParallelTinyLlama.from_dense(model, tp=tp, cp=cp, attention="ring", layout="zigzag")
    s, num_stages = pp.rank, pp.world_size
    stage = ts.PipelineStage(stage_module(par.blocks, s, num_stages, first=par.embed,
                                          last=nn.Sequential(par.norm, par.head)), s, num_stages, pp)

    def loss_fn(logits, targets):  # summed over this rank's tokens / its replica's tokens: replicas add to the mean
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / (targets.numel() * tp.world_size)

    schedule = ts.Schedule1F1B(stage, m, loss_fn=loss_fn)
    opt = torch.optim.AdamW(par.parameters(), lr=lr) if lr else None
    for batch in data:
        mine = batch.chunk(grid.size("dp"))[grid.get_local_rank("dp")]
        tokens, targets = (ts.shard_hybrid(t, tp, cp, "ring", "zigzag") for t in (mine[:, :-1], mine[:, 1:]))
        par.zero_grad()
        schedule.step(*([tokens] if stage.is_first else []), **({"target": targets} if stage.is_last else {}))
        ts.sync_gradients(par, grid, op="avg")
        if opt:
            opt.step()
    return ts.gather_dense_grads(par, tp), ts.gather_dense_parameters(par, tp)


def dense_steps(model, data, m, lr):
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr) if lr else None
    for batch in data:
        model.zero_grad()
        for mb in batch.chunk(m):
            (model.loss(mb[:, :-1], mb[:, 1:]) / m).backward()
        if opt:
            opt.step()
    return {n: q.grad for n, q in model.named_parameters()}, {n: q.detach() for n, q in model.named_parameters()}


def check(shape, steps, m, lr, batch, count_flops=False):
    model, data = model_and_batches(steps, batch)
    res = ts.run(pipeline_rank, model, data, shape, m, lr, world_size=int(torch.tensor(shape).prod()),
                 count_flops=count_flops)
    dense_grads, dense_weights = dense_steps(model, data, m, lr)
    seen = set()
    for grads, weights in res.outputs:
        for name, g in grads.items():
            assert torch.allclose(g, dense_grads[name], atol=1e-10, rtol=0), name
            assert torch.allclose(weights[name], dense_weights[name], atol=1e-10, rtol=0), name
            seen.add(name)
    assert seen == set(dense_grads)  # every parameter lives on some stage
    return res


@pytest.mark.parametrize("shape", [(2, 1, 1, 2), pytest.param((2, 2, 2, 2), marks=pytest.mark.slow)], ids=str)
def test_pp_x_tp_sp_x_ring_attention_is_exact(shape):
    """E.g. (pp, dp, cp, tp) = (2, 2, 2, 2) on 16 ranks: each activation crossing the stage boundary is the
    rank's own TP+SP shard, [b/(dp·m), s/(cp·tp), h]: s·b·h·8 / (dp·cp·tp·m) bytes, on axis "pp"."""
    m, batch, h = 2, 4, 16
    pp, dp, cp, tp = shape
    res = check(shape, steps=1, m=m, lr=0.0, batch=batch, count_flops=True)
    act = (batch // dp // m) * (SEQ // (cp * tp)) * h * 8
    sends = res.trace.filter(op="send", axis="pp")
    pairs = dp * cp * tp  # one pipeline per (dp, cp, tp) coordinate
    assert sends.total("sent_bytes", phase="forward") == pairs * (m * act + 80)  # plus one shape header
    assert sends.total("sent_bytes", phase="backward") == pairs * m * act
    assert "pp" in comm_bars(res.trace, by="axis")
    assert set(res.trace.filter(axis="pp").ops()) == {"send", "recv"}
    exposed = ts.timeline(res.trace, "h100-nvlink").exposed_by_axis(0)
    assert "pp" in exposed and exposed["pp"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 1, 2, 2), (2, 2, 1, 2)], ids=str)  # 8 ranks each
def test_twenty_adamw_steps_on_a_pipelined_mesh_equal_dense(shape):
    check(shape, steps=20, m=2, lr=1e-2, batch=4)
