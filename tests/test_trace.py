"""CommTrace: aggregates that say what they add up, filters that keep the right compute, the grad_sync phase."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tpsp_sim as ts
from tpsp_sim.core.trace import PHASES
from tpsp_sim.viz.plot import HATCH, plot_comm, plot_timeline


def uneven(comm, x):
    """Rank 0 broadcasts 40 B to everyone; ranks 0 and 1 then all-reduce 40 B on a pair."""
    with comm.scope("bcast"):
        comm.broadcast(x, src=0)
    pair = comm.new_group([0, 1])
    if pair is not None:
        with comm.scope("pair"):
            pair.all_reduce(x)


def test_aggregates_are_a_sum_a_map_a_mean_and_a_max():
    """Sent bytes, 3 ranks, x of 10 float32 = 40 B. Broadcast (pipelined ring from rank 0): ranks 0 and 1
    send 40, rank 2 (the last) sends 0. All_reduce on 2 ranks: 2·1/2·40 = 40 each for ranks 0 and 1."""
    trace = ts.run(uneven, torch.ones(10), world_size=3).trace
    assert trace.per_rank() == {0: 80, 1: 80, 2: 0}
    assert trace.total() == 160 and trace.mean_per_rank() == pytest.approx(160 / 3) and trace.max_per_rank() == 80
    assert trace.per_rank("recv_bytes") == {0: 40, 1: 80, 2: 40}  # the root receives nothing from the broadcast
    assert trace.per_rank(rank=2) == {2: 0} and trace.mean_per_rank(rank=lambda r: r > 0) == 40
    assert trace.per_rank(scope="pair") == {0: 40, 1: 40, 2: 0}
    assert trace.group_by(("scope", "op")) == {("bcast", "broadcast"): 80, ("pair", "all_reduce"): 80}
    assert trace.group_by("rank", lambda e: 1) == {0: 2, 1: 2, 2: 1}  # calls per rank
    assert trace.ranks == [0, 1, 2]


def test_a_rank_that_records_nothing_still_counts():
    def only_rank_0_talks(comm, x):
        pair = comm.new_group([0, 1])
        if pair is not None:
            pair.all_gather(x)

    trace = ts.run(only_rank_0_talks, torch.ones(4), world_size=3).trace
    assert trace.per_rank() == {0: 16, 1: 16, 2: 0} and trace.mean_per_rank() == pytest.approx(32 / 3)
    assert trace.filter(rank=0).ranks == [0, 1, 2]  # the run's ranks, whatever the filter kept


def two_scopes(comm, a):
    with comm.scope("first"):
        y = a @ a
        comm.all_reduce(y)
    with comm.scope("second"):
        z = a @ a @ a
        comm.all_reduce(z)


def test_filter_by_scope_keeps_only_that_scopes_compute():
    """Each matmul of 4x4 matrices is 2·4³ = 128 FLOPs: one in "first", two in "second"."""
    trace = ts.run(two_scopes, torch.ones(4, 4), world_size=2, count_flops=True).trace
    first, second = trace.filter(scope="first"), trace.filter(scope="second")
    assert {c.scope for c in first.compute} == {"first"} and sum(c.flops for c in first.compute) == 2 * 128
    assert {c.scope for c in second.compute} == {"second"} and sum(c.flops for c in second.compute) == 2 * 256
    assert sum(c.flops for c in trace.filter(op="all_reduce").compute) == 2 * 384  # no op on compute: all kept


def sp_norm_step(comm, x):
    """A LayerNorm on this rank's sequence shard, backward, then the post-backward gradient sums."""
    norm = ts.replicate(nn.LayerNorm(4, dtype=torch.float64), sequence_parallel=True)
    with comm.scope("block"):
        norm(x.chunk(comm.world_size, 1)[comm.rank]).pow(2).sum().backward()
    ts.sync_sequence_parallel_grads(norm, comm)
    return ts.gather_dense_grads(norm, comm)


def test_gradient_sums_after_backward_have_their_own_phase():
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    res = ts.run(sp_norm_step, x, world_size=3, count_flops=True)
    assert res.trace.ops(phase="grad_sync") == {"all_reduce": 3, "all_gather": 6}  # per rank: 1 + 2 (weight, bias)
    assert res.trace.count(phase="forward") == 0 and res.trace.count(scope="sp_grads", phase="grad_sync") == 3
    dense = nn.LayerNorm(4, dtype=torch.float64)
    dense(x).pow(2).sum().backward()
    torch.testing.assert_close(res.outputs[1]["weight"], dense.weight.grad, rtol=0, atol=1e-12)
    tl = ts.timeline(res.trace, "h100-nvlink")  # timelines and plots take the phase
    assert {s.phase for s in tl.spans if s.kind == "comm"} == {"grad_sync"}
    plot_comm(res.trace, "h100-nvlink")
    plot_timeline(tl)
    assert set(HATCH) == set(PHASES) and len(set(HATCH.values())) == len(PHASES)  # each phase drawn its own way


def test_an_unknown_phase_is_refused():
    def fn(comm):
        with comm.phase("warmup"):
            pass

    with pytest.raises(ValueError, match="unknown phase 'warmup'; phases are"):
        ts.run(fn, world_size=1)


def test_tables_render_as_text_markdown_and_html():
    trace = ts.run(uneven, torch.ones(10), world_size=3).trace
    text, markdown, html = trace.table(), trace.table("markdown"), trace._repr_html_()
    assert text.splitlines()[0].split() == ["scope", "phase", "op", "calls/rank", "sent/rank", "recv/rank"]
    assert "| pair | forward | all_reduce | 0 | 26 B | 26 B |" in markdown  # 2 calls, 80 B over 3 ranks
    assert "<th" in html and "pair" in html and str(trace) == text
    with pytest.raises(ValueError, match="unknown table format 'latex'"):
        trace.table("latex")


@pytest.mark.parametrize("filters, message", [
    ({"op": "all_gathr"}, r"no event can have op='all_gathr': the ops \('all_reduce', 'all_gather', "),
    ({"phase": "fwd"}, r"no event can have phase='fwd': the phases \('forward', 'backward', 'grad_sync'\)"),
    ({"rank": 7}, r"no event can have rank=7: the ranks 0..3 \(this run has 4\)"),
    ({"rank": True}, r"no event can have rank=True"),
    ({"opp": "all_reduce"}, r"unknown CommEvent field\(s\) \['opp'\]"),
])
def test_a_filter_no_event_can_match_is_a_value_error_listing_the_valid_values(filters, message):
    """Issue 24 item 11: a typo used to return 0 silently."""
    trace = ts.run(lambda comm: comm.all_reduce(torch.ones(2)), world_size=4).trace
    for aggregate in (trace.total, trace.per_rank, trace.count, trace.ops, trace.max_per_rank):
        with pytest.raises(ValueError, match=message):
            aggregate(**filters)
    with pytest.raises(ValueError, match=message):
        trace.filter(op="all_reduce").filter(**filters)  # a filtered trace still knows the run's ranks
    assert trace.total(op="all_gather") == 0 and trace.total(rank=3, op=lambda op: op == "all_reduce") == 12


def test_an_unknown_field_to_add_up_or_group_by_is_a_value_error():
    trace = ts.run(lambda comm: comm.all_reduce(torch.ones(2)), world_size=2).trace
    with pytest.raises(ValueError, match="unknown CommEvent field 'sent'"):
        trace.total("sent")
    with pytest.raises(ValueError, match="unknown CommEvent field 'opp'"):
        trace.group_by(("op", "opp"))
    assert trace.group_by(("op", "phase")) == {("all_reduce", "forward"): 16}
