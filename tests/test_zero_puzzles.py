"""The puzzles of notebook 10: each reference solution passes, and the wrong answers a learner would try
are told what is wrong (memory over the target, a reduction per micro-batch, the final reduction forgotten)."""

from __future__ import annotations

import pytest
import torch

import tpsp_sim as ts
from tpsp_sim.exercises import data_parallel as puzzles

pytestmark = pytest.mark.slow  # two AdamW steps on 4 virtual ranks per check: seconds each


@pytest.mark.parametrize("name", sorted(puzzles.PUZZLES))
def test_the_reference_solution_passes_and_a_stub_gets_it_checked(name):
    assert puzzles.check(name, puzzles.PUZZLES[name].solution).ok

    def stub(*args):
        raise NotImplementedError

    report = puzzles.check(name, stub)
    assert not report.ok and report.reference is not None and report.reference.ok


def test_a_not_implemented_error_from_torch_is_not_taken_for_the_stub():
    """An operation torch lacks, inside the learner's code, is reported as that, not as "not written yet"."""
    def shard(comm, net):
        torch.nn.Module()(net)  # a Module with no forward: torch raises NotImplementedError in its own code

    report = puzzles.check("fit_in_memory", shard)
    assert not report.ok and report.reference is None
    assert "not the unwritten stub" in report.problems[0], report.problems


def zero2(comm, net):
    ddp = ts.DistributedDataParallel(net, comm)
    return ddp, ts.ZeroOptimizer(ddp, torch.optim.AdamW, stage=2, lr=puzzles.LR)


def test_zero2_is_not_enough_for_the_memory_target():
    report = puzzles.check("fit_in_memory", zero2)
    assert not report.ok and "the target is 40% of plain data parallelism's" in str(report)


def reduce_every_micro_batch(ddp, opt, micro_batches, loss_fn):
    opt.zero_grad()
    for rows in micro_batches:
        (loss_fn(ddp, rows) / len(micro_batches)).backward()
    opt.step()


def forget_the_last_reduction(ddp, opt, micro_batches, loss_fn):
    opt.zero_grad()
    for rows in micro_batches:
        with ddp.no_sync():
            (loss_fn(ddp, rows) / len(micro_batches)).backward()
    opt.step()


def test_wrong_accumulations_are_named():
    assert "3.0 × one all-reduce of the gradients" in str(puzzles.check("accumulate_gradients", reduce_every_micro_batch))
    assert "never reduced" in str(puzzles.check("accumulate_gradients", forget_the_last_reduction))
    with pytest.raises(ValueError, match="no puzzle"):
        puzzles.check("zero4", zero2)
