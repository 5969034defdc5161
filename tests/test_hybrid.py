"""The hybrid block (TP+SP over tp × ring / Ulysses / USP over cp) equals the dense block forward and
backward in float64, for the GPT and the Llama block; its bytes per mesh axis equal the closed forms
of hybrid/context.py; sync_gradients reduces over the replica axes."""

from __future__ import annotations

import pytest
import torch

from helpers import seeded_randn
import tpsp_sim as ts
from tpsp_sim.hybrid.context import hybrid_positions, shard_hybrid

TOL = 1e-12
SEQ = 48  # divisible by 2·cp·t for every (cp, t) below


def make_mesh(comm, cp, t, attention):
    """The mesh and the cp argument: (cp, tp), or for USP (ring, ulysses, tp) with u = 2 where cp is even."""
    if attention != "usp":
        mesh = ts.init_device_mesh(comm, (cp, t), mesh_dim_names=("cp", "tp"))
        return mesh, mesh["cp"]
    u = 2 if cp % 2 == 0 else 1
    mesh = ts.init_device_mesh(comm, (cp // u, u, t), mesh_dim_names=("ring", "ulysses", "tp"))
    return mesh, (mesh["ulysses"], mesh["ring"])


def hybrid_rank(comm, dense, x, dy, cp_size, t, attention, layout, mode):
    mesh, cp = make_mesh(comm, cp_size, t, attention)
    tp = mesh["tp"]
    par = ts.ParallelTransformerBlock.from_dense(dense, tp=tp, cp=cp, mode=mode, attention=attention, layout=layout)
    sp = mode == "tp_sp"
    shard = lambda y: shard_hybrid(y, tp, cp, attention, layout, sequence_parallel=sp)
    x_local = shard(x).requires_grad_()
    y = par(x_local)
    y.backward(shard(dy))
    ts.sync_gradients(par, mesh, op="sum")  # the loss <y, dy> is a sum over every token
    positions = hybrid_positions(x.shape[1], tp, cp, attention, layout, sequence_parallel=sp)
    return y.detach(), x_local.grad, positions, ts.gather_dense_grads(par, tp)


def dense_reference(dense, x, dy):
    x = x.clone().requires_grad_()
    dense.zero_grad()
    y = dense(x)
    y.backward(dy)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in dense.named_parameters()}


def check_against_dense(dense, cp, t, attention, layout, mode="tp_sp", seed=0):
    x, dy = seeded_randn((2, SEQ, dense.d_model), (2, SEQ, dense.d_model), seed=seed)
    y_ref, dx_ref, grads_ref = dense_reference(dense, x, dy)
    res = ts.run(hybrid_rank, dense, x, dy, cp, t, attention, layout, mode, world_size=cp * t)
    covered = torch.cat([o[2] for o in res.outputs])
    copies = 1 if mode == "tp_sp" else t  # "tp_sp": every token on exactly one rank; "tp": on each of its t tp ranks
    assert sorted(covered.tolist()) == sorted(list(range(SEQ)) * copies)
    for y, dx, positions, grads in res.outputs:
        torch.testing.assert_close(y, y_ref[:, positions], rtol=0, atol=TOL)
        torch.testing.assert_close(dx, dx_ref[:, positions], rtol=0, atol=TOL)
        assert grads.keys() == grads_ref.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, grads_ref[name], rtol=0, atol=TOL, msg=name)
    return res


MESHES = [(2, 2), (4, 2), (2, 4), (3, 1)]  # (cp, tp)


def gpt(seed=0):
    torch.manual_seed(seed)
    return ts.TransformerBlock(d_model=48, n_heads=24, d_ff=96).double()  # 24 heads: heads/t divisible by cp


@pytest.mark.parametrize("attention", ["ring", "ulysses", "usp", "allgather"])
@pytest.mark.parametrize("cp, t", MESHES)
def test_gpt_hybrid_block_equals_dense(cp, t, attention):
    check_against_dense(gpt(), cp, t, attention, "zigzag")


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_gpt_hybrid_block_contiguous_layout_and_plain_tp_mode(layout):
    check_against_dense(gpt(1), 2, 2, "ring", layout)
    check_against_dense(gpt(2), 2, 2, "ring", layout, mode="tp")


def test_mode_defaults_to_tp_sp_with_cp_and_is_required_without():
    def build(comm, with_cp):
        mesh = ts.init_device_mesh(comm, (2, 2), mesh_dim_names=("cp", "tp"))
        cp = mesh["cp"] if with_cp else None
        return ts.ParallelTransformerBlock.from_dense(gpt(), tp=mesh["tp"], cp=cp, attention="ring").mode

    assert ts.run(build, True, world_size=4).outputs == ["tp_sp"] * 4
    with pytest.raises(ValueError, match=r"rank \d: ParallelTransformerBlock.from_dense: mode must be one of "
                                         r"\('tp', 'tp_sp'\) \(required without cp\), got None"):
        ts.run(build, False, world_size=4)


def llama(n_kv_heads, seed=0):
    torch.manual_seed(seed)
    block = ts.LlamaBlock(d_model=96, n_heads=24, n_kv_heads=n_kv_heads, d_ff=64).double()
    with torch.no_grad():  # RMSNorm weights start at one: make them distinguishable
        for p in (block.ln1.weight, block.ln2.weight):
            p.uniform_(0.5, 1.5)
    return block


@pytest.mark.parametrize("attention", ["ring", "ulysses", "usp", "allgather"])
@pytest.mark.parametrize("cp, t", MESHES)
@pytest.mark.parametrize("n_kv_heads", [24, 2])
def test_llama_hybrid_block_equals_dense(cp, t, attention, n_kv_heads):
    kv_per_rank = max(n_kv_heads // t, 1)  # K/V heads are replicated when t > n_kv_heads
    u = cp if attention == "ulysses" else (2 if cp % 2 == 0 else 1) if attention == "usp" else 1
    if kv_per_rank % u:
        pytest.skip(f"{kv_per_rank} K/V heads per tp rank do not split over {u} Ulysses ranks")
    check_against_dense(llama(n_kv_heads), cp, t, attention, "zigzag")


# ---- bytes per axis ---------------------------------------------------------------------------------

def bytes_rank(comm, dense, x, attention):
    mesh = ts.init_device_mesh(comm, (2, 2, 2), mesh_dim_names=("dp", "cp", "tp"))
    par = ts.ParallelTransformerBlock.from_dense(dense, tp=mesh["tp"], cp=mesh["cp"], mode="tp_sp",
                                                 attention=attention, layout="zigzag")
    shard = shard_hybrid(x[mesh.get_local_rank("dp")], mesh["tp"], mesh["cp"], attention, "zigzag")
    par(shard).sum().backward()
    ts.sync_gradients(par, mesh)


@pytest.mark.parametrize("attention", ["ring", "ulysses", "allgather"])
def test_bytes_per_axis_equal_the_closed_forms(attention):
    """GPT block, float32 (e = e_acc = 4), h = 8, n_heads = 4, d_ff = 16; per dp rank b = 1, s = 16;
    mesh dp = cp = t = 2. E = b·(s/cp)·h = 64 elements; E_kv = E/t = 32 (every head has its K/V).

    tp   forward 4(t-1)/t·E·4 = 512 B; backward 6(t-1)/t·E·4 = 768 B;
         sync_gradients: P_sp = ln1 (w, b) + ln2 (w, b) + proj.bias + fc2.bias = 6h = 48: 2·1/2·48·4 = 192 B
    cp   ring:    forward (cp-1)·2E_kv·4 = 256 B; backward 256 + cp·2E_kv·4 = 768 B
         ulysses: forward (u-1)/u·(2E/t + 2E_kv)·4 = 1/2·128·4 = 256 B; backward 256 B
         allgather: forward (cp-1)·2E_kv·4 = 256 B; backward (cp-1)·2E_kv·4 = 256 B (float32: e_acc = e)
    dp_cp  P = qkv (3h/t·h + 3h/t) + proj (h·h/t + h) + fc1 (16/t·h + 16/t) + fc2 (h·16/t + h) + 4h
           = 108 + 40 + 72 + 72 + 32 = 324; n = 4: 2·3/4·324·4 = 1944 B
    """
    torch.manual_seed(0)
    dense = ts.TransformerBlock(d_model=8, n_heads=4, d_ff=16)
    x = torch.randn(2, 1, 16, 8)
    trace = ts.run(bytes_rank, dense, x, attention, world_size=8).trace
    cp_fwd, cp_bwd = {"ring": (256, 768), "ulysses": (256, 256), "allgather": (256, 256)}[attention]
    for rank in range(8):
        sent = lambda **kw: trace.total(rank=rank, **kw)
        in_block = lambda s: s.split("/")[0] in ("attn", "mlp")  # not the gradient reductions after backward
        assert sent(axis="tp", phase="forward", scope=in_block) == 512
        assert sent(axis="tp", phase="backward", scope=in_block) == 768
        assert sent(axis="tp", scope="sp_grads") == 192
        assert (sent(axis="cp", phase="forward"), sent(axis="cp", phase="backward")) == (cp_fwd, cp_bwd)
        assert sent(axis="dp_cp") == 1944 and trace.count(rank=rank, axis="dp_cp") == 1
        assert sent(axis="dp") == 0 and sent(axis=None) == 0
        assert sent(phase="grad_sync") == 192 + 1944


# ---- sync_gradients ---------------------------------------------------------------------------------

def averaged(comm):
    mesh = ts.init_device_mesh(comm, (2, 3, 1), mesh_dim_names=("dp", "cp", "tp"))
    layer = torch.nn.Linear(2, 1, bias=False)
    layer.weight.grad = torch.full((1, 2), float(comm.rank))
    ts.sync_gradients(layer, mesh, op="avg")
    return layer.weight.grad


def test_sync_gradients_averages_over_dp_and_cp():
    out = ts.run(averaged, world_size=6)
    for grad in out.outputs:
        assert grad.tolist() == [[2.5, 2.5]]  # (0 + 1 + ... + 5) / 6
    assert out.trace.ops() == {"all_reduce": 6} and out.trace.count(axis="dp_cp_tp") == 0


def test_sync_gradients_rejects_an_unknown_op():
    def bad(comm):
        ts.sync_gradients(torch.nn.Linear(1, 1), ts.init_device_mesh(comm, (2,), mesh_dim_names=("dp",)), op="max")

    with pytest.raises(ValueError, match="sync_gradients op must be 'avg' or 'sum', got 'max'"):
        ts.run(bad, world_size=2, timeout=30)


def test_from_dense_rejects_bad_arguments():
    def build(comm, kind):
        mesh = ts.init_device_mesh(comm, (2, 1), mesh_dim_names=("cp", "tp"))
        dense = ts.TransformerBlock(8, 2, dropout=0.1 if kind == "dropout" else 0.0)
        cp = mesh["cp"] if kind != "usp" else mesh["cp"]
        return ts.ParallelTransformerBlock.from_dense(dense, tp=mesh["tp"], cp=cp, mode="tp_sp",
                                                      attention="usp" if kind == "usp" else "ring")

    with pytest.raises(ValueError, match="context-parallel attention has no dropout"):
        ts.run(build, "dropout", world_size=2, timeout=30)
    with pytest.raises(ValueError, match=r"attention='usp' needs cp=\(ulysses, ring\)"):
        ts.run(build, "usp", world_size=2, timeout=30)
