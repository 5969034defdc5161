"""The alpha-beta cost model equals its closed forms; estimates of real traces add up event by event."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tpsp_sim as ts
from tpsp_sim import cost
from tpsp_sim.core.ops import latency_steps
from tpsp_sim.core.mappings import f, f_bar, g, g_bar

HW = cost.Hardware("test link", link_bandwidth=2e9, latency=3e-6, peak_flops=1e12)
A, B = HW.latency, HW.link_bandwidth
WORLD_SIZES = [1, 2, 3, 4, 8]


def closed_form(op: str, n: int, p: int) -> float:
    """Thakur et al.'s ring costs, written out: n is this rank's input (the shard for all_gather)."""
    if op == "all_gather":
        N = p * n  # the full gathered size
        return A * (p - 1) + (p - 1) / p * N / B
    if op == "reduce_scatter":
        return A * (p - 1) + (p - 1) / p * n / B
    if op == "all_to_all":  # every pair posted at once (NCCL's grouped send/recv): one latency
        return (A if p > 1 else 0.0) + (p - 1) / p * n / B
    if op == "all_reduce":
        return 2 * (A * (p - 1) + (p - 1) / p * n / B)
    if op == "broadcast":
        return A * (p - 1) + (n / B if p > 1 else 0.0)
    if op in ("send", "recv"):
        return A + n / B
    if op == "barrier":
        return 2 * A * (p - 1)
    raise AssertionError(op)


@pytest.mark.parametrize("p", WORLD_SIZES)
@pytest.mark.parametrize("op", ["all_gather", "reduce_scatter", "all_reduce", "all_to_all", "broadcast", "barrier"])
def test_collective_time_equals_the_closed_form(op, p):
    n = 840 * 8  # divisible by every p above, so no byte is rounded away
    assert cost.collective_time(op, n, p, HW) == pytest.approx(closed_form(op, n, p), rel=1e-12)


@pytest.mark.parametrize("op", ["send", "recv"])
def test_point_to_point_is_one_message(op):
    assert cost.collective_time(op, 1000, 2, HW) == pytest.approx(A + 1000 / B, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(p=st.integers(1, 16), elements=st.integers(1, 10_000))
def test_property_all_reduce_costs_a_reduce_scatter_plus_an_all_gather(p, elements):
    N = p * elements * 4
    rs = cost.collective_time("reduce_scatter", N, p, HW)
    ag = cost.collective_time("all_gather", N // p, p, HW)  # all_gather's input is the shard
    assert cost.collective_time("all_reduce", N, p, HW) == pytest.approx(rs + ag, rel=1e-12)
    assert rs == pytest.approx(closed_form("reduce_scatter", N, p), rel=1e-12)


# Seconds of one call with an input of 6720 bytes on HW (α = 3 µs, B = 2 GB/s), worked out by hand:
# e.g. all_gather on 4 ranks sends 3 · 6720 = 20160 B in 3 steps: 3 · 3 µs + 20160 B / 2 GB/s = 19.08 µs.
HAND_MICROSECONDS = {  # op: (p = 2, p = 3, p = 4)
    "all_gather": (3 + 3.36, 6 + 6.72, 9 + 10.08),
    "reduce_scatter": (3 + 1.68, 6 + 2.24, 9 + 2.52),
    "all_reduce": (6 + 3.36, 12 + 4.48, 18 + 5.04),
    "all_to_all": (3 + 1.68, 3 + 2.24, 3 + 2.52),
    "broadcast": (3 + 3.36, 6 + 3.36, 9 + 3.36),
    "barrier": (6, 12, 18),
    "send": (3 + 3.36,) * 3,
    "recv": (3 + 3.36,) * 3,
}


@pytest.mark.parametrize("op", sorted(HAND_MICROSECONDS))
def test_collective_time_equals_hand_computed_numbers(op):
    for p, micros in zip((2, 3, 4), HAND_MICROSECONDS[op]):
        assert cost.collective_time(op, 6720, p, HW) == pytest.approx(micros * 1e-6, rel=1e-12), p
    if op not in ("send", "recv"):
        assert cost.collective_time(op, 6720, 1, HW) == 0.0  # one rank: nothing moves, no message


def test_latency_steps_are_the_messages_that_pay_latency():
    assert [latency_steps(op, 8) for op in ("all_gather", "reduce_scatter", "all_reduce", "all_to_all",
                                            "broadcast", "barrier", "send", "recv")] == [7, 7, 14, 1, 7, 14, 1, 1]


def test_collective_time_on_a_cluster_takes_the_group_ranks():
    """DGX H100: 1 MiB all_reduce on 8 ranks, 14 steps, 2·7/8·2^20 bytes: inside a node at NVLink 4's
    NVLS all_reduce bus bandwidth (2 µs, 480 GB/s), its all_gather at the ring's 370 GB/s; across
    nodes, one rank per node, at one NIC's achieved 48 GB/s (5 µs) as a ring, or as NCCL's tree (3 levels
    between 8 nodes, 2·2^20 bytes at 0.92 of 48 GB/s), which is faster; the one-link preset at the
    datasheet 450 GB/s."""
    inside = 14 * 2e-6 + 1.75 * 2**20 / 480e9
    across = 2 * 3 * 5e-6 + 2 * 2**20 / (0.92 * 48e9)
    assert across < 14 * 5e-6 + 1.75 * 2**20 / 48e9  # the ring: 108 µs against the tree's 77 µs
    assert cost.collective_time("all_reduce", 2**20, 8, "dgx-h100", ranks=range(8)) == pytest.approx(inside, rel=1e-12)
    assert cost.collective_time("all_gather", 2**17, 8, "dgx-h100", ranks=range(8)) == \
           pytest.approx(7 * 2e-6 + 7 * 2**17 / 370e9, rel=1e-12)
    assert cost.collective_time("all_reduce", 2**20, 8, cost.CLUSTERS["dgx-h100"], ranks=range(0, 64, 8)) == \
           pytest.approx(across, rel=1e-12)
    with pytest.raises(ValueError, match="cluster 'DGX H100' has two links .* pass ranks="):
        cost.collective_time("all_reduce", 2**20, 8, "dgx-h100")
    with pytest.raises(ValueError, match=r"ranks=\(0, 1\) are 2 ranks, world_size is 8"):
        cost.collective_time("all_reduce", 2**20, 8, "dgx-h100", ranks=(0, 1))
    # a one-level cluster needs no ranks: its one link, at its datasheet figure
    assert cost.collective_time("all_reduce", 2**20, 8, "h100-nvlink") == \
           pytest.approx(14 * 2e-6 + 1.75 * 2**20 / 450e9, rel=1e-12)


def test_nccl_runs_one_ring_per_nic_across_nodes():
    """Issue 19's case: a 512 MiB all_reduce over two DGX H100 nodes (16 ranks, 8 per node) runs 8 rings,
    one per NIC: min(370, 8 × 48) = 370 GB/s of bus bandwidth (it was priced at one NIC's 50 GB/s, 20.3 ms).
    With g ranks per node: min(370, g · 48); the fewest ranks any node holds sets g."""
    n = 512 * 2**20
    t = cost.collective_time("all_reduce", n, 16, "dgx-h100", ranks=range(16))
    # of the 30 latency steps, 2 cross the two nodes (5 µs), 28 stay inside one (2 µs)
    assert t == pytest.approx(2 * 5e-6 + 28 * 2e-6 + 2 * 15 / 16 * n / 370e9, rel=1e-12)
    assert 2 * 15 / 16 * n / t > 0.8 * 370e9  # within 20% of nccl-tests' bus bandwidth, latency included
    dgx = cost.CLUSTERS["dgx-h100"]
    for g, busbw in ((1, 48e9), (2, 96e9), (4, 192e9), (8, 370e9)):
        ranks = [node * 8 + i for node in range(2) for i in range(g)]
        assert dgx.link(ranks).busbw == busbw, g
    assert dgx.link([0, 1, 2, 8]).busbw == 48e9  # node 1 holds one rank: one NIC there
    assert dgx.link(range(8)) is dgx.intra_node and dgx.link(range(8)).span is None
    assert dgx.link([0, 8]) == dataclasses.replace(dgx.inter_node, span=cost.NodeSpan(2, 1, 1, dgx.intra_node, dgx.inter_node))
    # point-to-point stays one GPU's NIC, however many GPUs a node has
    shift = ts.run(lambda comm: comm.sendrecv(torch.zeros(1000), (comm.rank + 8) % 16, (comm.rank - 8) % 16),
                   world_size=16).trace
    est = cost.estimate(shift, dgx)
    sends = [est.of(e) for e in shift.events if e.op == "send"]
    assert sends == pytest.approx([5e-6 + 4000 / 48e9] * 16, rel=1e-12)
    # nominal pricing: the datasheet figures, 8 x 50 GB/s capped by NVLink's 450
    assert dgx.nominal().link(range(16)).busbw == 400e9 and dgx.nominal().link(range(8)).busbw == 450e9


NODES = cost.Cluster("4 x 2", 1e12, 2, cost.Link("fast", 100e9, 1e-6), cost.Link("slow", 10e9, 5e-6))


def test_an_all_reduce_across_nodes_runs_as_the_faster_of_nccls_ring_and_tree():
    """cost.py's closed forms on 4 nodes of 2 ranks (α = 5 µs between nodes, 1 µs inside; two rings, so
    B = min(100, 2 × 10) = 20 GB/s): the ring's 14 steps, 6 of them across nodes, 6·5 µs + 8·1 µs + 1.75·N/B
    = 38 µs + 1.75·N/B; the tree 2·(1·1 µs + ⌊log2 4⌋·5 µs) + 2N/(0.92·B) = 22 µs + 2.17·N/B. They cross
    where the ring's 16 µs of extra latency equals the tree's extra bandwidth time,
    N* = 8 µs · B / (1/0.92 − 7/8) = 755 kB: the tree below, the ring above."""
    ring = lambda n: 38e-6 + 1.75 * n / 20e9  # noqa: E731
    tree = lambda n: 22e-6 + 2 * n / (0.92 * 20e9)  # noqa: E731
    crossover = 8e-6 * 20e9 / (1 / 0.92 - 7 / 8)
    assert crossover == pytest.approx(7.5487e5, rel=1e-4)
    for n, algorithm in ((0, "tree"), (2**16, "tree"), (int(0.99 * crossover) // 8 * 8, "tree"),
                         (int(1.01 * crossover) // 8 * 8, "ring"), (2**30, "ring")):  # whole ring pieces
        assert cost.all_reduce_algorithm(n, 8, NODES, ranks=range(8)) == algorithm, n
        assert cost.collective_time("all_reduce", n, 8, NODES, ranks=range(8)) == \
            pytest.approx(min(ring(n), tree(n)), rel=1e-12), n
    # inside a node, and on a one-link cluster, there is no tree: the ring (or NVLS)
    assert cost.all_reduce_algorithm(8, 2, NODES, ranks=(0, 1)) == "ring"
    assert cost.all_reduce_algorithm(8, 8, HW) == "ring"
    # only all_reduce has a tree: the other collectives stay rings across nodes
    assert cost.collective_time("all_gather", 2**10, 8, NODES, ranks=range(8)) == \
        pytest.approx(3 * 5e-6 + 4 * 1e-6 + 7 * 2**10 / 20e9, rel=1e-12)  # 3 of 7 steps cross nodes


@pytest.mark.parametrize("ranks, crossover", [
    (range(0, 64, 8), (7 - 3) * 5e-6 * 48e9 / (1 / 0.92 - 7 / 8)),  # 8 nodes, one rank each: 4.53 MB
    (range(128), ((15 - 4) * 5e-6 + (128 - 16 - 8 + 1) * 2e-6) * 370e9 / (1 / 0.92 - 127 / 128)),  # 16 nodes: 1.03 GB
])
def test_the_readmes_dgx_h100_crossovers(ranks, crossover):
    """The sizes below which the tree wins on DGX H100 (README, Clusters): cost.py's N* with α = 5 µs between
    nodes, 2 µs inside, and the group's bus bandwidth (one NIC's 48 GB/s; eight rings' 370 GB/s): N* =
    ((n−1−⌊log2 n⌋)·α + (p−n−r+1)·α_intra)·B / (1/0.92 − (p−1)/p)."""
    assert crossover == pytest.approx(4.53e6 if len(ranks) == 8 else 1.035e9, rel=2e-3)
    p = len(ranks)
    assert cost.all_reduce_algorithm(int(0.999 * crossover), p, "dgx-h100", ranks=ranks) == "tree"
    assert cost.all_reduce_algorithm(int(1.001 * crossover), p, "dgx-h100", ranks=ranks) == "ring"


def test_all_reduce_times_names_bad_sizes_and_a_missing_ranks():
    with pytest.raises(ValueError, match="all_reduce_times: nbytes must be a number of bytes >= 0, got -1"):
        cost.all_reduce_times(-1, 8, NODES, ranks=range(8))
    with pytest.raises(ValueError, match="all_reduce_times: world_size must be an integer >= 1, got 0"):
        cost.all_reduce_algorithm(8, 0, NODES)
    with pytest.raises(ValueError, match="cluster '4 x 2' has two links .* pass ranks="):
        cost.all_reduce_algorithm(8, 8, NODES)


def test_a_nominal_link_prices_its_span_at_the_datasheet_figures_too():
    """Link.nominal() of a group's link across two DGX H100 nodes gives what Cluster.nominal() gives: NVLink at
    450 GB/s and NDR at 50 (not the measured 370 and 48) in the tree's chain and NICs as in the ring."""
    dgx = cost.CLUSTERS["dgx-h100"]
    n = 2**30
    assert cost.all_reduce_times(n, 16, dgx.link(range(16)).nominal()) == \
        pytest.approx(cost.all_reduce_times(n, 16, dgx.nominal(), ranks=range(16)), rel=1e-12)
    assert cost.all_reduce_times(n, 16, dgx.nominal(), ranks=range(16))["tree"] == \
        pytest.approx(2 * (7 * 2e-6 + 5e-6) + max(n / 400e9, 2 * n / 450e9) / 0.92, rel=1e-12)


def test_the_tree_chains_through_the_fullest_node_and_climbs_log2_nodes():
    """Ranks (0, 1, 2, 4) of nodes of 4: node 0 holds three (a chain of 2 hops at α_intra), node 1 one (so one
    NIC, 10 GB/s); two nodes, one tree edge each way: 2·(2·1 µs + 1·5 µs) + max(N/10 GB/s, 2N/100 GB/s)/0.92;
    the ring's 6 steps, 2 across: 2·5 µs + 4·1 µs + 1.5·N/10 GB/s.
    Five nodes, one rank each: depth ⌊log2 5⌋ = 2, and 2N cross each NIC."""
    quads = cost.Cluster("quads", 1e12, 4, NODES.intra_node, NODES.inter_node)
    assert quads.link((0, 1, 2, 4)).span == cost.NodeSpan(2, 3, 1, NODES.intra_node, NODES.inter_node)
    assert cost.all_reduce_times(1000, 4, quads, ranks=(0, 1, 2, 4)) == pytest.approx(
        {"ring": 14e-6 + 1500 / 10e9, "tree": 14e-6 + 1000 / (0.92 * 10e9)}, rel=1e-12)
    five = range(0, 20, 4)
    assert cost.all_reduce_times(1000, 5, quads, ranks=five)["tree"] == \
        pytest.approx(2 * 2 * 5e-6 + 2000 / (0.92 * 10e9), rel=1e-12)


def test_on_two_nodes_behind_a_slow_network_the_tree_sends_half_the_bytes_at_any_size():
    """Two nodes of 8 GPUs with one 12.5 GB/s NIC between them (a GPU's share 1.5625 GB/s; 8 rings use all of it)
    and a 150 GB/s NVLink: the ring sends 2·15/16·N across the NIC, the tree N, so at 1 GB the ring takes
    1.875·N/12.5 GB/s = 161 ms, the tree N/(0.92·12.5 GB/s) = 93 ms (nccl-tests#22: 268 and 134 ms). Both
    trees and the ring pay 2 inter-node latency steps; the ring 28 inside, the tree 14 (the chain)."""
    one_nic = cost.Cluster("2 x 8, one NIC", 1e12, 8, cost.Link("NVLink", 150e9, 2e-6),
                           cost.Link("one NIC shared by 8", 12.5e9 / 8, 5e-6))
    n = 2**30
    times = cost.all_reduce_times(n, 16, one_nic, ranks=range(16))
    assert times == pytest.approx({"ring": 2 * 5e-6 + 28 * 2e-6 + 1.875 * n / 12.5e9,
                                   "tree": 2 * (7 * 2e-6 + 5e-6) + n / (0.92 * 12.5e9)}, rel=1e-12)
    assert [cost.all_reduce_algorithm(size, 16, one_nic, ranks=range(16)) for size in (2**10, 2**20, 2**34)] == \
        ["tree"] * 3


def test_a_traced_all_reduce_across_nodes_is_priced_as_the_tree_and_keeps_the_rings_bytes():
    """Estimate and timeline read the same pricing: 8 ranks on NODES all-reduce 1,000 float32 (4,000 B): the
    tree's 22 µs + 8,000 B / (0.92 × 20 GB/s) on every rank; the trace still records the ring's 2·7/8·4,000 B."""
    trace = ts.run(lambda comm: comm.all_reduce(torch.zeros(1000)), world_size=8).trace
    tree = 22e-6 + 8000 / (0.92 * 20e9)
    assert [cost.estimate(trace, NODES).of(e) for e in trace.events] == pytest.approx([tree] * 8, rel=1e-12)
    assert ts.timeline(trace, NODES).end() == pytest.approx(tree, rel=1e-12)
    assert {e.sent_bytes for e in trace.events} == {7000}


@pytest.mark.parametrize("args, match", [
    (("all_reduce", -1, 4), "nbytes must be a number of bytes >= 0, got -1"),
    (("all_reduce", 8, 0), "world_size must be an integer >= 1, got 0"),
    (("all_reduce", 8, -2), "world_size must be an integer >= 1, got -2"),
    (("all_reduce", 8, 2.5), "world_size must be an integer >= 1, got 2.5"),
    (("all_reduce", "8", 2), "nbytes must be a number of bytes >= 0, got '8'"),
])
def test_collective_time_rejects_negative_bytes_and_rank_counts(args, match):
    with pytest.raises(ValueError, match=match):
        cost.collective_time(*args, HW)


def test_unknown_op_and_hardware_raise_value_errors():
    with pytest.raises(ValueError, match="unknown communication op 'gather'"):
        cost.collective_time("gather", 8, 2, HW)
    with pytest.raises(ValueError, match="unknown cluster 'tpu'"):
        cost.hardware("tpu")
    with pytest.raises(TypeError, match="hardware must be a Cluster"):
        cost.estimate(ts.CommTrace(), 3)


def test_presets_carry_their_datasheet_numbers():
    assert cost.hardware("h100-nvlink").link_bandwidth == 450e9  # 900 GB/s both ways
    assert cost.hardware("a100-nvlink").link_bandwidth == 300e9
    assert cost.INFINIBAND_NDR.link_bandwidth == 2 * cost.INFINIBAND_HDR.link_bandwidth  # 400 vs 200 Gb/s
    assert cost.PCIE_GEN4.link_bandwidth < cost.INFINIBAND_HDR.link_bandwidth * 2
    for hw in cost.PRESETS.values():
        assert hw.link_bandwidth > 0 and hw.latency > 0 and hw.peak_flops > 0 and hw.name
    assert cost.hardware(cost.A100_NVLINK) is cost.A100_NVLINK


# ---- ring attention's overlap condition ---------------------------------------------------------

@pytest.mark.parametrize("dtype_bytes", [2, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_at_the_overlap_block_compute_equals_transfer(dtype_bytes, head_dim):
    """The derivation: 4·c²·d FLOPs against 2·c·d·bytes on the link balance at c = bytes·F/(2B)."""
    for hw in cost.PRESETS.values():
        c = cost.ring_overlap_block(hw, dtype_bytes)
        compute = 4 * c * c * head_dim / hw.peak_flops
        transfer = 2 * c * head_dim * dtype_bytes / hw.link_bandwidth
        assert compute == pytest.approx(transfer, rel=1e-12)
        assert 4 * (c / 2) ** 2 * head_dim / hw.peak_flops < transfer / 2  # half the block: exposed


# ---- estimates of recorded traces ---------------------------------------------------------------

def tp_and_sp_layer(comm, x):
    """Megatron's four mappings, forward and backward, plus a broadcast and a ring shift."""
    p = comm.world_size
    with comm.scope("tp"):
        y = f_bar(f(x.clone().requires_grad_(), comm) * 2, comm)
    with comm.scope("sp"):
        shard = x.chunk(p, 1)[comm.rank].clone().requires_grad_()
        z = g_bar(g(shard, comm) * 3, comm)
    (y.sum() + z.sum()).backward()
    with comm.scope("misc"):
        comm.broadcast(x, src=0)
        if p > 1:
            comm.sendrecv(x, (comm.rank + 1) % p, (comm.rank - 1) % p)
    return y


def test_estimate_of_a_layer_equals_hand_computed_seconds():
    """p = 2, x of 2·12·5 float64 = 960 B (its sequence shard 480 B), α = 3 µs, B = 2 GB/s. Per rank:
    tp: an all_reduce of 960 B forward (f̄) and backward (f), each 2α + 960 B/B = 6 + 0.48 = 6.48 µs;
    sp: all_gather of 480 B and reduce_scatter of 960 B, each α + 480 B/B = 3.24 µs, forward and backward;
    misc: broadcast of 960 B (α + 960 B/B = 3.48 µs), then a sendrecv of 960 B: the send 3.48 µs, its receive
    0 s (it arrives on the other direction of the full-duplex link while the send leaves)."""
    trace = ts.run(tp_and_sp_layer, torch.randn(2, 12, 5, dtype=torch.float64), world_size=2).trace
    est = cost.estimate(trace, HW)
    us = 1e-6
    per_rank = 2 * 6.48 + 4 * 3.24 + 2 * 3.48  # 32.88 µs
    assert est.per_rank() == pytest.approx({0: per_rank * us, 1: per_rank * us}, rel=1e-12)
    assert est.total() == pytest.approx(2 * per_rank * us, rel=1e-12)  # the sum over both ranks
    assert est.mean_per_rank() == est.max_per_rank() == pytest.approx(per_rank * us, rel=1e-12)
    assert est.total(phase="backward") == pytest.approx(2 * (6.48 + 2 * 3.24) * us, rel=1e-12)
    assert est.group_by(("scope", "phase")) == pytest.approx(
        {("tp", "forward"): 2 * 6.48 * us, ("sp", "forward"): 4 * 3.24 * us, ("tp", "backward"): 2 * 6.48 * us,
         ("sp", "backward"): 4 * 3.24 * us, ("misc", "forward"): 4 * 3.48 * us}, rel=1e-12)
    assert [row[-1] for row in est.rows() if row[:3] == ("misc", "forward", "send")] == pytest.approx([3.48 * us])
    assert [row[-1] for row in est.rows() if row[:3] == ("misc", "forward", "recv")] == [0.0]
    assert "| tp | forward | all_reduce | 1 | 960 B | 6.5 µs |" in est.table("markdown")
    assert "test link" in str(est) and "<td" in est._repr_html_()


def test_estimate_aggregates_tell_the_sum_the_mean_and_the_busiest_rank_apart():
    """Ranks 0 and 1 all-reduce 960 B on a subgroup (6.48 µs each, as above); rank 2 only joins new_group."""
    def fn(comm, x):
        pair = comm.new_group([0, 1])
        if pair is not None:
            pair.all_reduce(x)

    trace = ts.run(fn, torch.zeros(120, dtype=torch.float64), world_size=3).trace
    est = cost.estimate(trace, HW)
    assert est.per_rank() == pytest.approx({0: 6.48e-6, 1: 6.48e-6, 2: 0.0}, rel=1e-12)
    assert est.total() == pytest.approx(12.96e-6, rel=1e-12)
    assert est.mean_per_rank() == pytest.approx(4.32e-6, rel=1e-12)
    assert est.max_per_rank() == pytest.approx(6.48e-6, rel=1e-12)
    assert est.per_rank(rank=2) == {2: 0.0}
    assert (trace.per_rank(), trace.total(), trace.mean_per_rank(), trace.max_per_rank()) == (
        {0: 960, 1: 960, 2: 0}, 1920, 640.0, 960)


@pytest.mark.parametrize("p", [2, 3, 4])
def test_estimate_of_a_tp_layer_is_four_all_reduces(p):
    """Forward f̄ and backward f: 2 all-reduces of b·s·h elements per layer and direction pair."""
    b, s, h = 2, 3, 8
    x = torch.randn(b, s, h, dtype=torch.float64)

    def layer(comm, x):
        with comm.scope("mlp"):
            y = f_bar(f(x.clone().requires_grad_(), comm), comm)
        y.sum().backward()

    est = cost.estimate(ts.run(layer, x, world_size=p).trace, HW)
    N = b * s * h * 8
    assert est.mean_per_rank() == pytest.approx(2 * closed_form("all_reduce", N, p), rel=1e-12)
    assert est.group_by(("scope", "phase")) == pytest.approx(
        {("mlp", "forward"): p * closed_form("all_reduce", N, p),
         ("mlp", "backward"): p * closed_form("all_reduce", N, p)}, rel=1e-12)


def test_estimate_filters_reject_unknown_fields_and_faster_links_are_faster():
    trace = ts.run(tp_and_sp_layer, torch.randn(2, 12, 5, dtype=torch.float64), world_size=2).trace
    with pytest.raises(ValueError, match="unknown CommEvent field"):
        cost.estimate(trace, HW).per_rank(colour="red")
    faster = cost.Hardware("faster", link_bandwidth=2 * B, latency=A, peak_flops=HW.peak_flops)
    assert cost.estimate(trace, faster).total() < cost.estimate(trace, HW).total()


def test_format_seconds():
    assert [cost.format_seconds(t) for t in (0, 2.5, 1.5e-3, 3.25e-6, 4e-9)] == ["0 s", "2.5 s", "1.5 ms", "3.2 µs",
                                                                                  "4.0 ns"]


def test_estimate_aggregates_are_floats_even_when_nothing_matches():
    """Seconds are floats, 0.0 when no call matches; a trace's byte sums stay ints (0 when none match)."""
    trace = ts.run(lambda comm: comm.all_reduce(torch.ones(4)), world_size=2).trace
    est = cost.estimate(trace, HW)
    empty = (est.total(op="send"), est.max_per_rank(op="send"), est.mean_per_rank(op="send"))
    assert empty == (0.0, 0.0, 0.0) and all(type(t) is float for t in empty)
    assert all(type(t) is float for t in est.per_rank(op="send").values())
    assert trace.max_per_rank(op="send") == 0 and type(trace.max_per_rank(op="send")) is int
    assert trace.max_per_rank() == 16 and type(trace.max_per_rank()) is int  # 2·1/2·16 bytes


# ---- point-to-point: a send and a receive posted together share a full-duplex link -------------

# A100 NVLink preset: α = 2 µs, B = 300 GB/s. A message of 150,000 float32 = 600,000 B takes
# 2 µs + 600,000 B / 300 GB/s = 2 + 2 = 4 µs.
NVLINK_MESSAGE = 4e-6


def shift_isend_irecv(comm, x):
    """One ring shift as ring attention posts it: isend to the right, irecv from the left, then wait."""
    p = comm.world_size
    sent, received = comm.isend(x, (comm.rank + 1) % p), comm.irecv(x, (comm.rank - 1) % p)
    sent.wait()
    return received.wait()


def shift_sendrecv(comm, x):
    p = comm.world_size
    return comm.sendrecv(x, (comm.rank + 1) % p, (comm.rank - 1) % p)


@pytest.mark.parametrize("shift", [shift_isend_irecv, shift_sendrecv])
@pytest.mark.parametrize("p", [2, 3, 4])
def test_a_ring_shift_costs_one_message_per_rank_not_two(p, shift):
    """Every rank sends 600,000 B right while receiving 600,000 B from the left: 4 µs, not 8 µs."""
    assert (cost.A100_NVLINK.latency, cost.A100_NVLINK.link_bandwidth) == (2e-6, 300e9)
    trace = ts.run(shift, torch.zeros(150_000), world_size=p).trace
    est = cost.estimate(trace, cost.A100_NVLINK)
    assert est.per_rank() == pytest.approx({r: NVLINK_MESSAGE for r in range(p)}, rel=1e-12)
    assert est.total(op="send") == pytest.approx(p * NVLINK_MESSAGE, rel=1e-12)  # each transfer once
    assert est.total(op="recv") == 0.0
    assert all(est.of(e) == 0.0 for e in trace.filter(op="recv").events)


def test_a_one_way_send_costs_the_sender_and_the_waiting_receiver():
    """Rank 0 sends 600,000 B to rank 1 (blocking): each rank spends 4 µs in it. Then a ping-pong,
    rank 0 sends and then receives (blocking, one after the other): 8 µs on each rank."""
    def one_way(comm, x):
        if comm.rank == 0:
            comm.send(x, 1)
        else:
            comm.recv(x, 0)

    def ping_pong(comm, x):
        if comm.rank == 0:
            comm.send(x, 1)
            comm.recv(x, 1)
        else:
            comm.recv(x, 0)
            comm.send(x, 0)

    x = torch.zeros(150_000)
    one = cost.estimate(ts.run(one_way, x, world_size=2).trace, cost.A100_NVLINK)
    assert one.per_rank() == pytest.approx({0: NVLINK_MESSAGE, 1: NVLINK_MESSAGE}, rel=1e-12)
    assert one.per_rank(op="recv") == pytest.approx({0: 0.0, 1: NVLINK_MESSAGE}, rel=1e-12)
    both = cost.estimate(ts.run(ping_pong, x, world_size=2).trace, cost.A100_NVLINK)
    assert both.per_rank() == pytest.approx({0: 2 * NVLINK_MESSAGE, 1: 2 * NVLINK_MESSAGE}, rel=1e-12)


def test_a_ring_shift_across_nodes_costs_each_rank_its_slower_direction():
    """Two nodes of 2 GPUs, NVLink 4 inside (α = 2 µs, 450 GB/s), InfiniBand NDR between (5 µs, 50 GB/s),
    both at their datasheet figures (``Cluster.nominal``); 900,000 B per message: 2 + 2 = 4 µs inside a
    node, 5 + 18 = 23 µs across. On the ring 0→1→2→3→0
    the hops 1→2 and 3→0 cross nodes, so every rank either sends or receives over NDR: 23 µs each.
    Rank 0 sends to 1 on NVLink (its send 4 µs) and receives from 3 over NDR (its receive adds 19 µs)."""
    dgx = cost.CLUSTERS["dgx-h100"]
    two_nodes = cost.Cluster("2 x 2", 1e12, 2, dgx.intra_node, dgx.inter_node).nominal()
    assert (two_nodes.intra_node.latency, two_nodes.intra_node.bandwidth) == (2e-6, 450e9)
    assert (two_nodes.inter_node.latency, two_nodes.inter_node.bandwidth) == (5e-6, 50e9)
    trace = ts.run(shift_isend_irecv, torch.zeros(225_000), world_size=4).trace
    est = cost.estimate(trace, two_nodes)
    assert est.per_rank() == pytest.approx({r: 23e-6 for r in range(4)}, rel=1e-12)
    assert est.per_rank(op="send") == pytest.approx({0: 4e-6, 1: 23e-6, 2: 4e-6, 3: 23e-6}, rel=1e-12)
    assert est.per_rank(op="recv") == pytest.approx({0: 19e-6, 1: 0.0, 2: 19e-6, 3: 0.0}, rel=1e-12, abs=1e-18)


def ring_attention_forward_backward(comm, q, k, v):
    shards = [ts.shard_sequence(t, comm.rank, comm.world_size, dim=2).requires_grad_() for t in (q, k, v)]
    ts.ring_attention(*shards, comm).sum().backward()


def one_way_send(comm, x):
    if comm.rank == 0:
        comm.send(x, 1)
    elif comm.rank == 1:
        comm.recv(x, 0)


QKV = tuple(torch.randn(1, 2, 24, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3))
CASES = {"isend/irecv shift": (shift_isend_irecv, (torch.zeros(250),)),
         "sendrecv shift": (shift_sendrecv, (torch.zeros(250),)),
         "one-way send": (one_way_send, (torch.zeros(250),)),
         "ring attention forward+backward": (ring_attention_forward_backward, QKV)}
TWO_NODES = cost.Cluster("2 x 2 toy", 1e12, 2, cost.Link("fast", 4e9, 1e-7), cost.Link("slow", 1e9, 5e-7))


@pytest.mark.parametrize("hw", [cost.A100_NVLINK, TWO_NODES], ids=lambda hw: hw.name)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("p", [2, 3, 4])
def test_point_to_point_estimate_per_rank_equals_the_timeline_without_compute(p, case, hw):
    """With no compute and every rank posting at once, a rank's predicted seconds are the time its
    links are busy in ``ts.timeline`` (full duplex there too)."""
    fn, args = CASES[case]
    trace = ts.run(fn, *args, world_size=p).trace
    tl, est = ts.timeline(trace, hw), cost.estimate(trace, hw)
    assert est.per_rank() == pytest.approx({r: tl.comm(r) for r in range(p)}, rel=1e-12)
    assert est.total() > 0
