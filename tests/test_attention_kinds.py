"""The attention-kind registry: every kind exact against dense, its bytes, causal work and constraints
as it declares them, Llama 3's all-gather kind, and a toy kind flowing through everything that reads it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tpsp_sim as ts
from attention_cases import dense_grads, make_qkv, sharded_grads
from tpsp_sim.analysis import layer as layering, planner as planning, sweep
from tpsp_sim.context_parallel.allgather import allgather_attention
from tpsp_sim.context_parallel.kind import AttentionKind, LocalShape
from tpsp_sim.context_parallel.registry import ATTENTIONS, attention_kind, register
from tpsp_sim.viz.plot import plot_comm

TOL = 1e-12


def run_kind(kind: AttentionKind, u: int, r: int, q, k, v, dout, *, causal: bool, layout: str, count_flops=False):
    """``kind`` on a (ring r, ulysses u) mesh on shards of full q, k, v; returns ((out, dq, dk, dv) unsharded, res)."""
    def fn(comm):
        mesh = ts.init_device_mesh(comm, (r, u), mesh_dim_names=("ring", "ulysses"))
        uly, ring = mesh["ulysses"], mesh["ring"]
        lay = layout if "ring" in kind.groups else "contiguous"

        def shard(x):
            return ts.usp_shard_sequence(x, uly.rank, u, ring.rank, r, dim=2, layout=lay)
        qs, ks, vs = (shard(x).requires_grad_() for x in (q, k, v))
        out = kind.attend(qs, ks, vs, ulysses=uly if "ulysses" in kind.groups else None,
                          ring=ring if "ring" in kind.groups else None, causal=causal, layout=lay)
        out.backward(shard(dout))
        return out.detach(), qs.grad, ks.grad, vs.grad

    res = ts.run(fn, world_size=u * r, count_flops=count_flops)
    lay = layout if "ring" in kind.groups else "contiguous"
    full = tuple(ts.usp_unshard_sequence([o[i] for o in res.outputs], u, dim=2, layout=lay) for i in range(4))
    return full, res


def grids(kind: AttentionKind) -> list[tuple[int, int]]:
    """(u, r) to try: one group of 1, 2, 3 or 4 ranks, or u × r grids for a kind with both."""
    if kind.groups == ("ring",):
        return [(1, 1), (1, 2), (1, 3), (1, 4)]
    if kind.groups == ("ulysses",):
        return [(1, 1), (2, 1), (3, 1), (4, 1)]
    return [(2, 2), (3, 2), (2, 3), (4, 1), (1, 3)]


KINDS = sorted(ATTENTIONS)


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [12, 6])  # GQA where the heads allow
def test_every_kind_is_exact_and_moves_the_bytes_it_declares(name, causal, kv_heads):
    kind = ATTENTIONS[name]
    for u, r in grids(kind):
        q, k, v, dout = make_qkv(2, 12, kv_heads, 4 * u * r, 3)
        if kind.problem(LocalShape(2, 12, kv_heads, 4, 3), u, r, "zigzag"):
            continue
        got, res = run_kind(kind, u, r, q, k, v, dout, causal=causal, layout="zigzag")
        want = dense_grads(q, k, v, dout, causal)
        assert max((a - b).abs().max().item() for a, b in zip(got, want)) < TOL, (name, u, r)
        shape = LocalShape(2, 12, kv_heads, 4, 3, elem=8, acc=8)
        declared = kind.wire_bytes(shape, u, r)
        for rank in range(u * r):
            for group in ("ulysses", "ring"):
                for phase in ("forward", "backward"):
                    moved = res.trace.total("sent_bytes", rank=rank, axis=group, phase=phase)
                    assert moved == declared.get((group, phase), 0), (name, u, r, rank, group, phase)
                    assert res.trace.total("recv_bytes", rank=rank, axis=group, phase=phase) == moved


def test_wire_bytes_closed_forms_by_hand():
    """Each kind's formula with numbers: E_q = 2·8·16·4 = 1024, E_kv = 256 elements, 2-byte inputs, 4-byte acc."""
    shape = LocalShape(batch=2, q_heads=8, kv_heads=2, tokens=16, head_dim=4)
    assert ATTENTIONS["ring"].wire_bytes(shape, 1, 4) == {("ring", "forward"): 3 * 512 * 2,
                                                          ("ring", "backward"): 3 * 512 * 2 + 4 * 512 * 4}
    assert ATTENTIONS["ulysses"].wire_bytes(shape, 2, 1) == {("ulysses", "forward"): (2048 + 512) * 2 // 2,
                                                             ("ulysses", "backward"): (2048 + 512) * 2 // 2}
    assert ATTENTIONS["allgather"].wire_bytes(shape, 1, 4) == {("ring", "forward"): 3 * 512 * 2,
                                                               ("ring", "backward"): 3 * 512 * 4}
    usp = ATTENTIONS["usp"].wire_bytes(shape, 2, 3)
    assert usp[("ulysses", "forward")] == 2560 and usp[("ring", "backward")] == 2 * 512 * 2 + 3 * 512 * 4
    assert ATTENTIONS["allgather"].extra_saved_bytes(shape, 1, 4) == 3 * 512 * 2  # the other ranks' K/V
    assert ATTENTIONS["ring"].extra_saved_bytes(shape, 1, 4) == 0


@pytest.mark.parametrize("name", KINDS)
def test_causal_excess_leaves_each_rank_its_balanced_share_of_the_causal_flops(name):
    """On the meta device, as the planner simulates: counted by the simulator minus the declared excess =
    what a causal flash kernel does per rank, forward 4·d·H·b·(s²/2)/cp (half the score matrix, shared
    evenly: zigzag), backward 2.5× that."""
    kind = ATTENTIONS[name]
    b, heads, tokens, d = 1, 4, 4, 8
    for u, r in grids(kind):  # one rank included: a zigzag shard is two chunks there too
        cp, s = u * r, tokens * u * r
        if kind.problem(LocalShape(b, heads, heads, tokens, d), u, r, "zigzag"):
            continue
        q, k, v, dout = (x.to("meta") for x in make_qkv(b, heads, heads, s, d))
        _, res = run_kind(kind, u, r, q, k, v, dout, causal=True, layout="zigzag", count_flops=True)
        forward_excess, backward_excess = kind.causal_excess(LocalShape(b, heads, heads, tokens, d), u, r, "zigzag")
        ideal = 4 * d * heads * b * (s * s / 2) / cp
        for rank in range(cp):
            spans = [c for c in res.trace.compute if c.rank == rank]
            forward = sum(c.flops for c in spans if c.phase == "forward")
            backward = sum(c.flops for c in spans if c.phase == "backward")
            assert forward - forward_excess == ideal, (name, u, r, rank)
            assert backward - backward_excess == 2.5 * ideal, (name, u, r, rank)


def test_allgather_equals_dense_on_both_layouts_odd_groups_and_bfloat16():
    for p in (1, 2, 3, 5):
        for layout in ("contiguous", "zigzag"):
            for causal in (False, True):
                q, k, v, dout = make_qkv(2, 4, 2, 2 * p * 3, 5, seed=p)
                got, _ = sharded_grads(allgather_attention, q, k, v, dout, p, causal=causal, layout=layout)
                want = dense_grads(q, k, v, dout, causal)
                assert max((a - b).abs().max().item() for a, b in zip(got, want)) < TOL, (p, layout, causal)
    q, k, v, dout = make_qkv(1, 2, 2, 16, 8, dtype=torch.bfloat16)
    got, res = sharded_grads(allgather_attention, q, k, v, dout, 4, causal=True, layout="zigzag")
    want = dense_grads(*(x.double() for x in (q, k, v, dout)), True)
    assert all(g.dtype == torch.bfloat16 for g in got)
    assert max((a.double() - b).abs().max().item() for a, b in zip(got, want)) < 0.05
    # 16-bit inputs: dK/dV reduce-scattered in float32 (4 bytes), K/V gathered in bf16 (2 bytes)
    assert res.trace.total("sent_bytes", rank=0, op="reduce_scatter") == 3 * 2 * (1 * 2 * 4 * 8) * 4


def test_allgather_is_one_gather_forward_and_one_reduce_scatter_backward_under_its_scope():
    q, k, v, dout = make_qkv(1, 2, 2, 12, 4)
    _, res = sharded_grads(allgather_attention, q, k, v, dout, 3, causal=True, layout="zigzag")
    calls = [(e.op, e.phase, e.scope) for e in res.trace.events if e.rank == 1]
    assert calls == [("all_gather", "forward", "allgather_attn"), ("reduce_scatter", "backward", "allgather_attn")]


def test_allgather_rejects_an_odd_zigzag_shard_naming_the_rank():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ts.RankFailedError, match=r"rank \d: allgather_attention\(layout='zigzag'\) needs an even"):
        ts.run(lambda comm: allgather_attention(q, q, q, comm, layout="zigzag"), world_size=2)


def test_problems_name_the_sizes_and_match_what_the_run_raises():
    shape = LocalShape(1, 6, 3, 4, 8)
    assert "divisible by u=4; got 6 query and 3 key/value heads" in ATTENTIONS["ulysses"].problem(shape, 4, 1, "zigzag")
    assert ATTENTIONS["usp"].problem(shape, 3, 2, "zigzag") is None
    odd = LocalShape(1, 6, 3, 3, 8)
    assert "even number of tokens per rank, got 3" in ATTENTIONS["allgather"].problem(odd, 1, 2, "zigzag")
    assert ATTENTIONS["allgather"].problem(odd, 1, 2, "contiguous") is None
    assert "got 3" in ATTENTIONS["ring"].problem(odd, 1, 1, "zigzag")  # as ring_attention raises on one rank
    q, k, v, dout = make_qkv(1, 6, 3, 16, 2)
    with pytest.raises(ts.RankFailedError, match="heads divisible by world_size 4"):
        run_kind(ATTENTIONS["ulysses"], 4, 1, q, k, v, dout, causal=True, layout="zigzag")


def test_unknown_kinds_and_bad_declarations_are_refused():
    with pytest.raises(ValueError, match=r"attention must be one of \('ring', 'ulysses', 'usp', 'allgather'"):
        attention_kind("rnig")
    with pytest.raises(ValueError, match="already registered"):
        register(ATTENTIONS["ring"])
    with pytest.raises(ValueError, match="groups must be some of"):
        dataclasses.replace(ATTENTIONS["usp"], name="bad", groups=("ring", "ulysses"))


@pytest.fixture
def toy_kind(monkeypatch):
    """A kind registered for the test only: all-gather attention under another name and summary."""
    toy = dataclasses.replace(ATTENTIONS["allgather"], name="toy", summary="a test's toy")
    monkeypatch.setitem(ATTENTIONS, "toy", toy)
    return toy


def test_a_registered_kind_flows_through_the_hybrid_block_and_the_planner(toy_kind):
    torch.manual_seed(0)
    dense = ts.LlamaBlock(16, 4, 2, 32).double()
    x = torch.randn(2, 16, 16, dtype=torch.float64)

    def fn(comm):
        mesh = ts.init_device_mesh(comm, (2, 2), mesh_dim_names=("cp", "tp"))
        block = ts.ParallelTransformerBlock.from_dense(dense, tp=mesh["tp"], cp=mesh["cp"], attention="toy")
        return block(ts.shard_hybrid(x, mesh["tp"], mesh["cp"], "toy")), mesh["cp"].rank, mesh["tp"].rank

    res = ts.run(fn, world_size=4)
    want = dense(x)

    def piece(cp_rank, tp_rank):
        return next(out for out, c, t in res.outputs if (c, t) == (cp_rank, tp_rank))
    got = ts.unshard_sequence([torch.cat([piece(c, 0), piece(c, 1)], 1) for c in range(2)], dim=1, layout="zigzag")
    assert (got - want).abs().max().item() < TOL
    assert {e.scope.split("/")[-1] for e in res.trace.events if e.axis == "cp"} == {"allgather_attn"}
    # the planner tries it and prices its causal work by its own declaration
    assert ("toy", "toy", 1) in planning._attention_kinds(4, ["ring", "toy"])
    m = ts.Model("tiny", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab=100)
    assert layering.causal_overcount(m, 64, 4, 1, "toy") == layering.causal_overcount(m, 64, 4, 1, "allgather")
    assert layering.causal_overcount(m, 64, 4, 1, "toy") != layering.causal_overcount(m, 64, 4, 1, "ring")


def test_a_registered_kind_flows_through_the_memory_budget_the_sweep_and_the_plots(toy_kind):
    m = ts.Model("tiny", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab=100)
    ring = ts.memory.budget(m, (1, 4, 1), 256, 1, recompute="selective", attention="ring")
    toy = ts.memory.budget(m, (1, 4, 1), 256, 1, recompute="selective", attention="toy")
    gathered = 2 * 3 * (64 * 2 * 16) * 2  # the other 3 ranks' K and V: 64 tokens x 2 heads x 16, bf16
    assert toy.activations_per_layer - ring.activations_per_layer == gathered
    assert toy.activations - ring.activations == m.n_layers * gathered
    full = [ts.memory.budget(m, (1, 4, 1), 256, 1, recompute="full", attention=a) for a in ("ring", "toy")]
    assert full[0].activations == full[1].activations  # recomputed, gathered K/V included
    with pytest.raises(ValueError, match="attention must be one of"):
        ts.memory.budget(m, (1, 4, 1), 256, 1, attention="rnig")
    # the sweep (and so the report and the dashboard) runs every single-group kind, the toy too
    assert sweep.all_methods()[-1] == "toy" and "usp" not in sweep.all_methods()
    cfg = sweep.Config(world_size=4, seq=64, hidden=64, heads=4)
    trace = sweep.record("toy", cfg)
    assert trace.ops(rank=0) == {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 1}
    fig = plot_comm({"toy": trace, "ring": sweep.record("ring", cfg)}, "dgx-h100")
    labels = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()]
    assert "toy" in labels and "ring" in labels
