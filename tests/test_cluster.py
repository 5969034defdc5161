"""Clusters price each call on its group's link; the corrected formulas (all_to_all latency, GQA and
backward overlap blocks, the context-parallel weight-gradient all-reduce) equal hand-computed numbers."""

import dataclasses

import pytest
import torch

import tpsp_sim as ts
from tpsp_sim import cost
from tpsp_sim.analysis.sweep import Config, measure, record

FAST = cost.Link("fast", bandwidth=1e9, latency=1e-6)
SLOW = cost.Link("slow", bandwidth=1e8, latency=1e-5)


def two_level(gpus_per_node):
    return cost.Cluster("test", peak_flops=1e12, gpus_per_node=gpus_per_node, intra_node=FAST, inter_node=SLOW,
                        memory_bytes=1e9)


def test_presets_carry_their_datasheet_numbers():
    h100, a100, pcie = (cost.CLUSTERS[k] for k in ("dgx-h100", "dgx-a100", "pcie-a100"))
    assert (h100.gpus_per_node, h100.intra_node.bandwidth, h100.inter_node.bandwidth) == (8, 450e9, 50e9)
    assert (a100.gpus_per_node, a100.intra_node.bandwidth, a100.inter_node.bandwidth) == (8, 300e9, 25e9)
    assert (pcie.intra_node.bandwidth, pcie.inter_node.bandwidth) == (31.5e9, 3.125e9)  # one 200 Gb/s port per 8
    assert (h100.peak_flops, a100.peak_flops, h100.memory_bytes) == (989e12, 312e12, 85_899_345_920)  # 80 GiB
    for key, hw in cost.PRESETS.items():  # the one-link presets are one-level clusters with the same numbers
        one = cost.CLUSTERS[key]
        assert one.gpus_per_node is None and one.intra_node == one.inter_node
        assert (one.name, one.intra_node.bandwidth, one.intra_node.latency, one.peak_flops) == \
               (hw.name, hw.link_bandwidth, hw.latency, hw.peak_flops)


def test_a_group_uses_the_intra_node_link_only_inside_one_node():
    c = cost.CLUSTERS["dgx-h100"]
    assert c.link(range(8)) is c.intra_node and c.link((8, 15)) is c.intra_node
    for ranks, nodes in (((7, 8), 2), ((0, 8, 16), 3)):  # one rank per node: one NIC, and where the group sits
        assert c.link(ranks) == dataclasses.replace(c.inter_node, span=cost.NodeSpan(nodes, 1, 1, c.intra_node, c.inter_node))
    assert c.link(range(16)).busbw == min(c.intra_node.busbw, 8 * c.inter_node.busbw)  # 8 rings, 8 NICs
    with pytest.raises(ValueError, match="gpus_per_node must be >= 1"):
        two_level(0)
    with pytest.raises(ValueError, match="unknown cluster 'tpu-pod'"):
        cost.estimate(ts.CommTrace(), "tpu-pod")


def test_a_ring_that_mixes_links_runs_one_ring_per_nic():
    """Ranks 0-3 on nodes of 2: NCCL runs 2 rings, each crossing nodes on its own GPU's NIC, so the group
    moves its bytes at 2 × the slow link (capped by the fast one); of its 3 steps, one crosses the two nodes
    (the slow link's latency), two stay inside one (the fast link's). On nodes of 4 the group is inside one
    node: the fast link."""
    c = two_level(2)
    n = 4000  # bytes of each rank's shard
    trace = ts.run(lambda comm: comm.all_gather(torch.zeros(n // 4)), world_size=4).trace
    est = cost.estimate(trace, c)
    assert est.of(trace.events[0]) == pytest.approx(1e-5 + 2 * 1e-6 + 3 * 4000 / 2e8, rel=1e-12)  # α + 2α_intra + 3n/(2B)
    est = cost.estimate(trace, two_level(4))
    assert est.of(trace.events[0]) == pytest.approx(3 * 1e-6 + 3 * 4000 / 1e9, rel=1e-12)
    capped = cost.Cluster("capped", 1e12, 4, cost.Link("fast", 1e9, 1e-6), cost.Link("fat", 6e8, 1e-5))
    assert capped.link(range(8)).busbw == 1e9  # 4 x 600 MB/s of NICs, but NVLink carries every ring: 1 GB/s


def mesh_program(comm):
    """An all_reduce over tp and an all_gather over cp, on a (cp=4, tp=2) mesh of 8 ranks."""
    mesh = ts.init_device_mesh(comm, (4, 2), mesh_dim_names=("cp", "tp"))
    mesh["tp"].all_reduce(torch.zeros(1000))  # 4000 bytes
    mesh["cp"].all_gather(torch.zeros(1000))  # a 4000-byte shard


def test_the_same_trace_costs_more_when_its_cp_axis_spans_nodes():
    trace = ts.run(mesh_program, world_size=8).trace
    inside = cost.estimate(trace, two_level(8))  # one node holds the whole mesh
    across = cost.estimate(trace, two_level(2))  # a node holds one tp pair: cp crosses nodes
    tp_fast = 2 * 1e-6 + 4000 / 1e9  # all_reduce, p = 2: 2α + 2·(1/2)·N/B
    cp_fast, cp_slow = 3 * 1e-6 + 12000 / 1e9, 3 * 1e-5 + 12000 / 1e8  # all_gather, p = 4: 3α + 3n/B
    for est, cp_time in ((inside, cp_fast), (across, cp_slow)):
        assert est.per_rank(axis="tp")[5] == pytest.approx(tp_fast, rel=1e-12)
        assert est.per_rank(axis="cp")[5] == pytest.approx(cp_time, rel=1e-12)
    tl_inside, tl_across = ts.timeline(trace, two_level(8)), ts.timeline(trace, two_level(2))
    assert tl_inside.end() == pytest.approx(tp_fast + cp_fast, rel=1e-12)
    assert tl_across.end() == pytest.approx(tp_fast + cp_slow, rel=1e-12)
    assert tl_across.exposed_by_axis(3) == pytest.approx({"tp": tp_fast, "cp": cp_slow}, rel=1e-12)


def test_sends_use_the_link_between_their_two_ranks():
    def shift(comm):
        comm.sendrecv(torch.zeros(250), (comm.rank + 1) % 4, (comm.rank - 1) % 4)  # 1000 bytes

    trace = ts.run(shift, world_size=4).trace
    est = cost.estimate(trace, two_level(2))
    sends = {e.rank: est.of(e) for e in trace.events if e.op == "send"}
    # 0->1 and 2->3 stay in a node; 1->2 and 3->0 cross
    assert sends == pytest.approx({0: 1e-6 + 1e-6, 1: 1e-5 + 1e-5, 2: 1e-6 + 1e-6, 3: 1e-5 + 1e-5}, rel=1e-12)


def test_one_link_presets_price_the_same_as_their_hardware():
    trace = ts.run(mesh_program, world_size=8).trace
    by_name, by_hardware = cost.estimate(trace, "h100-nvlink"), cost.estimate(trace, cost.H100_NVLINK)
    assert by_name.seconds == by_hardware.seconds
    assert ts.timeline(trace, "h100-nvlink").end() == ts.timeline(trace, cost.H100_NVLINK).end()


# ---- the corrections -------------------------------------------------------------------------------

def test_all_to_all_pays_one_latency():
    """NCCL posts all pairs of an all_to_all at once: α + (p-1)/p·N/B, not (p-1)·α + ..."""
    assert cost.collective_time("all_to_all", 4000, 4, FAST) == pytest.approx(1e-6 + 3000 / 1e9, rel=1e-12)
    assert cost.collective_time("all_to_all", 4000, 8, SLOW) == pytest.approx(1e-5 + 3500 / 1e8, rel=1e-12)
    assert cost.collective_time("all_to_all", 4000, 1, SLOW) == 0.0


def test_overlap_block_with_grouped_query_attention():
    # A100 NVLink: F/B = 312e12 / 300e9 = 1040 tokens for 16-bit K/V; 8 K/V heads of 64: 1040 / 8 = 130.
    assert cost.ring_overlap_block("a100-nvlink") == pytest.approx(1040.0)
    assert cost.ring_overlap_block("a100-nvlink", n_heads=64, n_kv_heads=8) == pytest.approx(130.0)
    # DGX H100 across nodes (one NDR NIC, achieved 48 GB/s): 989e12 / 48e9 = 20604; Llama 3 8B, 32 heads,
    # 8 K/V: 5151; inside a node at NVLink 4's achieved 370 GB/s.
    assert cost.ring_overlap_block("dgx-h100", n_heads=32, n_kv_heads=8) == pytest.approx(989e12 / 48e9 / 4)
    assert cost.ring_overlap_block("dgx-h100", link=cost.CLUSTERS["dgx-h100"].intra_node) == \
           pytest.approx(989e12 / 370e9)
    with pytest.raises(ValueError, match="n_heads=12 must be a multiple of n_kv_heads=8"):
        cost.ring_overlap_block("a100-nvlink", n_heads=12, n_kv_heads=8)


def test_backward_overlap_block():
    """Backward: bf16 K, V plus fp32 dK, dV (12 bytes per K/V element pair) against 10·c²·d FLOPs per head."""
    assert cost.ring_overlap_block_backward("a100-nvlink") == pytest.approx(1248.0)  # 1.2 x 1040
    assert cost.ring_overlap_block_backward("a100-nvlink", n_heads=64, n_kv_heads=8) == pytest.approx(156.0)
    assert cost.ring_overlap_block_backward("a100-nvlink", grad_bytes=2) == pytest.approx(832.0)  # 0.8 x 1040


def test_backward_overlap_block_on_the_simulator():
    """The simulated backward ring hides its transfers only for blocks above the backward threshold:
    then only the last dK/dV shift (home, after the last tile) is exposed."""
    toy = cost.Hardware("toy", link_bandwidth=1e9, latency=0.0, peak_flops=32e9)
    block = cost.ring_overlap_block_backward(toy, dtype_bytes=4, grad_bytes=4)  # float32: 8 · 32e9 / 5e9 = 51.2
    assert block == pytest.approx(51.2)
    p, d = 3, 8

    def fn(comm, n, backward):
        g = torch.Generator().manual_seed(comm.rank)
        q, k, v = (torch.randn(1, 1, n, d, generator=g).requires_grad_() for _ in range(3))
        out = ts.ring_attention(q, k, v, comm, causal=False)
        if backward:
            out.sum().backward()

    for n, hidden in ((40, False), (64, True)):  # on either side of 51.2 tokens
        both = ts.timeline(ts.run(fn, n, True, world_size=p, count_flops=True).trace, toy)
        forward = ts.timeline(ts.run(fn, n, False, world_size=p, count_flops=True).trace, toy)
        last_shift = 2 * n * d * 4 / 1e9
        backward_exposed = both.exposed(1) - forward.exposed(1)
        assert (backward_exposed == pytest.approx(last_shift, rel=1e-9)) == hidden, (n, backward_exposed, last_shift)


def test_context_parallel_methods_all_reduce_their_replicated_weight_gradients():
    """Per block: P = 12h² + 13h parameters (h = 32: 12704), 2 bytes each, 2(p-1)/p of them on the wire."""
    cfg = Config(world_size=4, seq=64, hidden=32, heads=4)
    for method in ("ring", "ulysses"):
        sync = record(method, cfg).filter(phase="grad_sync")
        assert [(e.op, e.nbytes, e.sent_bytes) for e in sync.events] == [("all_reduce", 25408, 38112)] * 4
    sync = record("tp", cfg).filter(phase="grad_sync")
    assert sync.events == []  # sharded weights: nothing to reduce
    sync = record("tp_sp", cfg).filter(phase="grad_sync")  # 2 LayerNorms (4h) and the 2 row biases (2h)
    assert {e.nbytes for e in sync.events} == {6 * 32 * 2}


def test_the_sweep_prices_methods_on_a_cluster():
    """The method sweep (and the report) take clusters: Ulysses on 4 ranks costs more across nodes of 2."""
    cfg = Config(world_size=4, seq=64, hidden=32, heads=4)
    inside, across = measure("ulysses", cfg, two_level(4)), measure("ulysses", cfg, two_level(2))
    assert across.seconds > 5 * inside.seconds and across.sent == inside.sent


def test_one_hardware_type_every_preset_with_its_sources():
    """``Hardware(...)`` makes a one-level ``Cluster``; every preset names its sources; the issue's GPUs are there."""
    toy = ts.Hardware("toy", link_bandwidth=1e9, latency=1e-6, peak_flops=1e12)
    assert isinstance(toy, cost.Cluster) and toy.gpus_per_node is None and toy.intra_node is toy.inter_node
    assert (toy.link_bandwidth, toy.latency) == (1e9, 1e-6) and cost.hardware(toy) is toy
    with pytest.raises(ValueError, match="'DGX H100' has two links"):
        cost.CLUSTERS["dgx-h100"].link_bandwidth
    for key, c in cost.CLUSTERS.items():
        assert c.source and c.intra_node.source and c.inter_node.source, key
    memory = {k: cost.CLUSTERS[k].memory_bytes for k in ("dgx-h100", "dgx-h200", "dgx-b200", "dgx-a100", "dgx-a100-40gb")}
    assert memory == {"dgx-h100": 80 * 2**30, "dgx-h200": 141e9, "dgx-b200": 180e9, "dgx-a100": 80 * 2**30,
                      "dgx-a100-40gb": 40 * 2**30}
    nvl72 = cost.CLUSTERS["gb200-nvl72"]
    assert nvl72.gpus_per_node == 72 and nvl72.link(range(72)) is nvl72.intra_node  # one NVLink domain
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        cost.Link("broken", 0, 1e-6)
