"""USP (Ulysses inside, ring across): exact against dense SDPA forward and backward on u × r grids,
bytes per mesh axis equal to the closed forms of usp.py, and the heads check."""

from __future__ import annotations

import pytest
import torch
from attention_cases import dense_grads, make_qkv, max_error

import tpsp_sim as ts
from tpsp_sim.context_parallel.usp import usp_shard_sequence, usp_unshard_sequence

TOL = 1e-10


def usp_rank(comm, q, k, v, dout, r, u, causal, layout):
    mesh = ts.init_device_mesh(comm, (r, u), mesh_dim_names=("ring", "ulysses"))
    shard = lambda x: usp_shard_sequence(x, mesh.get_local_rank("ulysses"), u, mesh.get_local_rank("ring"), r,
                                         dim=2, layout=layout)
    q, k, v = (shard(x).requires_grad_() for x in (q, k, v))
    out = ts.usp_attention(q, k, v, ulysses=mesh["ulysses"], ring=mesh["ring"], causal=causal, layout=layout)
    out.backward(shard(dout))
    return out.detach(), q.grad, k.grad, v.grad


def run_usp(q, k, v, dout, r, u, causal, layout):
    res = ts.run(usp_rank, q, k, v, dout, r, u, causal, layout, world_size=r * u)
    full = tuple(usp_unshard_sequence([o[i] for o in res.outputs], u, dim=2, layout=layout) for i in range(4))
    return full, res


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("r, u", [(1, 2), (2, 1), (2, 2), (2, 4), (4, 2), (3, 2), (2, 3)])
def test_usp_equals_dense_forward_and_backward(r, u, causal, layout):
    q, k, v, dout = make_qkv(2, 2 * u, u, 2 * r * u * 3, 4, seed=r + 10 * u)  # GQA: two query heads per K/V head
    got, _ = run_usp(q, k, v, dout, r, u, causal, layout)
    assert max_error(got, dense_grads(q, k, v, dout, causal)) <= TOL


def test_usp_shard_then_unshard_is_the_identity():
    x = torch.arange(24).view(1, 24)
    pieces = [usp_shard_sequence(x, j, 2, i, 3, dim=1, layout="zigzag") for i in range(3) for j in range(2)]
    # zigzag over 3 ring ranks: chunks (i, 5-i) of 6 chunks of 4; then halves over 2 Ulysses ranks
    assert pieces[0].tolist() == [[0, 1, 2, 3]] and pieces[1].tolist() == [[20, 21, 22, 23]]
    assert pieces[2].tolist() == [[4, 5, 6, 7]] and pieces[5].tolist() == [[12, 13, 14, 15]]
    assert torch.equal(usp_unshard_sequence(pieces, 2, dim=1, layout="zigzag"), x)


def test_usp_bytes_per_axis_equal_the_closed_forms():
    """b=1, h=4, h_kv=2, s=16, d=2, float64, r=u=2 (cp=4): E_q = 1·4·4·2 = 32, E_kv = 16 elements.

    ulysses, each way: (u-1)/u·(2E_q + 2E_kv)·8 = 1/2·96·8 = 384 B
    ring forward: (r-1)·2E_kv·8 = 256 B;  backward: 256 + r·2E_kv·8 = 256 + 512 = 768 B
    """
    q, k, v, dout = make_qkv(1, 4, 2, 16, 2)
    _, res = run_usp(q, k, v, dout, 2, 2, True, "zigzag")
    trace = res.trace
    for rank in range(4):
        sent = lambda axis, phase: trace.total(rank=rank, axis=axis, phase=phase)
        assert (sent("ulysses", "forward"), sent("ulysses", "backward")) == (384, 384)
        assert (sent("ring", "forward"), sent("ring", "backward")) == (256, 768)
        assert trace.total("recv_bytes", rank=rank) == trace.total(rank=rank)
    assert set(e.scope for e in trace.events) == {"usp_attn", "usp_attn/ring_attn"}
    assert trace.ops(axis="ulysses") == {"all_to_all": 4 * 8}


def call_usp(comm, q):
    mesh = ts.init_device_mesh(comm, (2, 2), mesh_dim_names=("ring", "ulysses"))
    return ts.usp_attention(q, q, q, mesh["ulysses"], mesh["ring"])


def test_usp_needs_heads_divisible_by_the_ulysses_size():
    with pytest.raises(ValueError, match=r"usp_attention needs heads divisible by its size u=2; got 3 query heads"):
        ts.run(call_usp, torch.zeros(1, 3, 4, 2), world_size=4, timeout=30)
