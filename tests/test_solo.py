"""One rank simulated alone (ts.sim.solo) records what simulating every rank records, for the planner's layers."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import tpsp_sim as ts
from tpsp_sim.analysis.layer import simulate_layer, symmetric_layer
from tpsp_sim.analysis.models import Model
from tpsp_sim.analysis.replay import timeline
from tpsp_sim.core import flops
from tpsp_sim.sim.solo import Symmetric, run_solo, run_symmetric

LLAMA = Model("tiny-llama", 2, 96, 12, 4, 160, 100)  # GQA: 3 query heads per K/V head
FEW_KV = Model("few-kv", 2, 64, 8, 2, 128, 100)  # tp = 4 or 8 replicates each K/V head on tp/2 ranks
GPT = Model("tiny-gpt", 2, 64, 4, 4, 256, 100, mlp="gelu")
# Four GPUs a node, so that the larger meshes' groups and ring neighbours cross nodes on some ranks only.
FAST, SLOW = ts.cost.Link("fast", bandwidth=1e9, latency=1e-6), ts.cost.Link("slow", bandwidth=1e8, latency=1e-5)
QUADS = ts.cost.Cluster("quads", peak_flops=1e12, gpus_per_node=4, intra_node=FAST, inter_node=SLOW, memory_bytes=1e9)
TRIPLES = ts.cost.Cluster("triples", peak_flops=1e12, gpus_per_node=3, intra_node=FAST, inter_node=SLOW,
                          memory_bytes=1e9)  # nodes that cut most meshes unevenly
P2P = ("send", "recv")

# (model, cp, tp, attention, ulysses): odd context sizes, GQA, both MLPs, every kind, meshes across nodes.
CASES = [(LLAMA, 1, 1, "ring", 1), (LLAMA, 2, 2, "ring", 1), (LLAMA, 3, 1, "ring", 1), (LLAMA, 3, 2, "ring", 1),
         (LLAMA, 8, 1, "ring", 1), (GPT, 4, 2, "ring", 1), (LLAMA, 2, 2, "ulysses", 1), (GPT, 4, 1, "ulysses", 1),
         (LLAMA, 4, 2, "allgather", 1), (LLAMA, 3, 1, "allgather", 1), (LLAMA, 4, 1, "usp", 2),
         (GPT, 4, 2, "usp", 2),
         # tp > n_kv_heads: groups of tp/n_kv ranks share a replicated K/V head (not a whole mesh axis)
         (FEW_KV, 1, 4, "ring", 1), (FEW_KV, 2, 8, "ring", 1), (FEW_KV, 2, 4, "allgather", 1)]


def _calls(trace: ts.CommTrace, rank: int) -> list[tuple]:
    """A rank's calls in program order; a send and a receive posted at once are one unordered pair (ring
    shifts post them in an order that depends on the rank's parity)."""
    calls = [(e.seq, e.op, e.group, e.peer, e.shape, e.dtype, e.nbytes, e.sent_bytes, e.recv_bytes, e.scope,
              e.phase, e.blocking, e.batched, e.axis) for e in trace.events if e.rank == rank]
    waits = [("wait", w.seq) for w in trace.waits if w.rank == rank]
    merged = sorted(calls + waits, key=lambda c: c[1] if c[0] == "wait" else c[0])
    out, i = [], 0
    while i < len(merged):  # consecutive non-blocking send and receive: compare as a set
        c = merged[i]
        if c[0] != "wait" and c[1] in P2P and not c[11] and i + 1 < len(merged) and merged[i + 1][0] != "wait" \
                and merged[i + 1][1] in P2P and not merged[i + 1][11]:
            out.append(frozenset(x[1:] for x in merged[i:i + 2]))
            i += 2
        else:
            out.append(c[1:] if c[0] != "wait" else c)
            i += 1
    return out


@pytest.mark.parametrize("m, cp, tp, attention, u", CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_one_rank_gives_every_ranks_trace_and_timeline(m, cp, tp, attention, u, monkeypatch):
    """Every rank simulated, each tile computed (``flops.SHAPES_ONLY`` off), against the planner's way: the
    symmetric box simulated, repeated tiles answered from their first run."""
    seq = 2 * 3 * 4 * cp * tp
    one = simulate_layer(m, cp, tp, attention, seq, 2, u)
    monkeypatch.setattr(flops, "SHAPES_ONLY", False)
    every = simulate_layer(m, cp, tp, attention, seq, 2, u, every_rank=True)
    monkeypatch.setattr(flops, "SHAPES_ONLY", True)
    assert one.world_size == every.world_size == cp * tp
    assert one.compute == every.compute  # FLOPs between the same calls, rank by rank
    assert one.events and len(one.events) == len(every.events)
    for rank in range(cp * tp):
        assert _calls(one, rank) == _calls(every, rank)
    assert Counter(one.group_by("op").items()) == Counter(every.group_by("op").items())
    symmetric = symmetric_layer(m, cp, tp, attention, seq, 2, u)
    for c in (QUADS, TRIPLES, "dgx-h100"):
        rows = timeline(every, c, mfu=0.5).rows()
        assert timeline(one, c, mfu=0.5).rows() == rows
        replayed = timeline(symmetric, c, mfu=0.5).rows()  # the ranks the cluster's nodes tell apart
        assert replayed == [row for row in rows if row[0] in {r[0] for r in replayed}]
        if c == "dgx-h100":  # one node holds the mesh: only the program's own box is replayed
            assert len(replayed) == len(symmetric.box_ranks) == (1 if tp <= m.n_kv_heads else tp // m.n_kv_heads)


def test_collectives_alone_return_the_shapes_every_rank_would():
    def program(comm):
        x = torch.empty(2, 6, device="meta")
        assert comm.all_gather(x, 1).shape == (2, 18)
        assert comm.reduce_scatter(x, 1).shape == (2, 2)
        assert comm.all_to_all(x, 1, 0).shape == (6, 2)
        assert comm.all_reduce(x).shape == (2, 6)
        assert comm.sendrecv(x, 2, 0).shape == (2, 6)
        sub = comm.new_group([0, 1])
        assert sub.world_size == 2 and sub.group == (0, 1) and comm.new_group([0, 2]) is None
        sub.all_gather(x)
    trace = run_solo(program, world_size=3, rank=1)
    assert [e.op for e in trace.events] == ["all_gather", "reduce_scatter", "all_to_all", "all_reduce", "send", "recv",
                                            "all_gather"]
    n = 2 * 6 * 4
    assert [e.sent_bytes for e in trace.events] == [2 * n, 2 * n // 3, 2 * n // 3, 4 * n // 3, n, 0, n]
    assert {e.rank for e in trace.events} == {1} and trace.events[-1].group == (0, 1)


def test_tensors_with_values_and_broadcasts_are_refused():
    with pytest.raises(ValueError, match=r"rank 0 of group .*all_reduce: run_solo simulates one rank on meta tensors"):
        run_solo(lambda comm: comm.all_reduce(torch.ones(3)), world_size=2)
    with pytest.raises(ValueError, match=r"rank=2 is not in \[0, world_size=2\)"):
        run_solo(lambda comm: None, world_size=2, rank=2)
    with pytest.raises(ValueError, match="broadcast's bytes depend on each rank's distance from its root"):
        run_symmetric(lambda comm: comm.broadcast(torch.empty(4, device="meta"), 1), shape=(2,))
    one = Symmetric(run_solo(lambda comm: comm.barrier(), world_size=4), (2, 2), (1, 1))
    with pytest.raises(ValueError, match=r"period \(1, 3\) must be multiples of \(1, 1\) dividing the mesh \(2, 2\)"):
        one.coarsened((1, 3))
    assert one.coarsened((2, 1)).box_ranks == [0, 2] and one.trace().count(op="barrier") == 4


def test_groups_that_are_not_whole_axes_set_the_period_and_unmatched_sends_are_refused():
    def pairs(comm):  # ranks {0, 1}, {2, 3}, ... reduce together: symmetric under shifts by 2 only
        x = torch.empty(3, device="meta")
        groups = [comm.new_group([r, r + 1]) for r in range(0, comm.world_size, 2)]
        next(g for g in groups if g is not None).all_reduce(x)
    symmetric = run_symmetric(pairs, shape=(6,))
    assert symmetric.period == (2,) and symmetric.box_ranks == [0, 1]
    assert [e.group for e in symmetric.trace().events] == [(0, 1), (0, 1), (2, 3), (2, 3), (4, 5), (4, 5)]

    def first_rank_talks_to_the_last(comm):  # only rank 0 sends: no translation maps it to the others
        if comm.rank == 0:
            comm.send(torch.empty(2, device="meta"), comm.world_size - 1)
    with pytest.raises(ValueError, match=r"not symmetric under its translations: rank 3 does not make send 0 from "
                                         r"rank 0 to rank 3"):
        run_symmetric(first_rank_talks_to_the_last, shape=(4,))



def test_a_repeated_tile_gets_its_first_runs_layout_and_flops_and_values_are_always_computed():
    q, k, v = (torch.empty(1, 2, 8, 4, device="meta") for _ in range(3))
    with flops.FlopCounter() as counter:
        first = ts.attention_block(q, k, v, causal=True)
        again = ts.attention_block(q, k, v, causal=True)
        other = ts.attention_block(q[:, :, :4], k, v)  # another shape: computed
    assert [(t.shape, t.stride(), t.dtype) for t in again] == [(t.shape, t.stride(), t.dtype) for t in first]
    assert again[0] is not first[0] and other[0].shape == (1, 2, 4, 4)
    per_tile = 4 * 8 * 8 * 4 * 2  # Q Kᵀ and P V: 2 · 2 · n · m · d per head, 2 heads
    assert [f for _, f in counter.take()] == [2 * per_tile + per_tile // 2]
    real = torch.randn(1, 2, 8, 4)
    with flops.FlopCounter():  # values: always computed
        assert torch.equal(ts.attention_block(real, real, real)[0], ts.attention_block(real, real, real)[0])
