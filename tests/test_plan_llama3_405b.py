"""Llama 3 405B on 16,384 H100s: the paper's Table 4 splits (arXiv 2407.21783) fit and rank first among the planner's
splits with the same tp and cp (search held to tp = 8 and the paper's cp: the layer simulation grows with cp·tp)."""

import pytest

from tpsp_sim.analysis.planner import plan, table
from tpsp_sim.analysis.published_splits import LLAMA3_405B_TABLE4

GIB = 2**30


def search(row, **options):
    return plan("llama3-405b", row.seq, row.gpus, "dgx-h100", tp=row.tp, cp=row.cp, attentions=("ring",),
                zero=(1, 2, 3), virtual_stages=(1, 2, 4), global_batch_tokens=row.tokens_per_batch, **options)


def the_papers(plans, row):
    return [p for p in plans if (p.pp, p.dp, p.cp, p.tp) == (row.pp, row.dp, row.cp, row.tp)]


def test_the_8k_split_of_table_4_fits_and_ranks_first():
    """8K tokens, TP 8, CP 1, PP 16, DP 128: 16 micro-batches per pipeline (16 sequences per DP group, the paper's).
    The planner's best is the paper's split, interleaved with v = 4 (126 layers as 1 + 2·62 + 1 over 64 chunks),
    full recompute and ZeRO 1; with selective recompute 1F1B keeps 16 micro-batches of 7 or 8 layers on the first
    ranks: 126 layers' worth of 8K-token activations, 71.7 GiB, which does not fit beside ZeRO 1's 18.1 GiB."""
    row = LLAMA3_405B_TABLE4[1]
    assert (row.gpus, row.tp, row.cp, row.pp, row.dp, row.seq, row.batch_per_dp) == (16384, 8, 1, 16, 128, 8192, 16)
    plans = search(row)
    best = plans[0]
    assert the_papers(plans, row)[0] is best, table(plans, 5)
    assert (best.v, best.microbatches, best.recompute, best.zero, best.schedule) == (4, 16, "full", 1, "interleaved_1f1b")
    assert round(best.memory.total / GIB, 1) == 24.1 and best.memory.layers == 8
    selective = [p for p in the_papers(plans, row) if p.recompute == "selective" and p.zero == 1]
    assert selective and not any(p.fits for p in selective)
    assert all(round(p.memory.activations / GIB, 1) >= 71.7 for p in selective)
    assert [(p.pp, p.dp, p.v) for p in plans[:3]] == [(16, 128, 4), (8, 256, 4), (4, 512, 4)]


@pytest.mark.slow  # one layer of 405B on 128 virtual ranks: ~12 s on 2 cores, load 4
def test_the_128k_split_of_table_4_fits_and_ranks_first():
    """128K tokens, TP 8, CP 16, PP 16, DP 8: each cp rank holds 8K tokens, the 8K split's memory exactly; the
    paper's split ranks first among every pp x dp with its tp and cp."""
    row = LLAMA3_405B_TABLE4[2]
    plans = search(row)
    best = plans[0]
    assert the_papers(plans, row)[0] is best, table(plans, 5)
    assert (best.v, best.microbatches, best.recompute, best.zero) == (4, 16, "full", 1)
    assert round(best.memory.total / GIB, 1) == 24.1
