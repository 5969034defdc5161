"""Issue 21, bad input: a step whose gradients were never reduced fails loudly, naming the rank and the
parameter, under DDP's no_sync and FSDP's set_requires_gradient_sync(False) — never a silently wrong model.
A torch.optim step is refused at once (a global step pre-hook); an update by hand at the next forward."""

from __future__ import annotations

import copy

import pytest
import torch

import tpsp_sim as ts
from dp_cases import batches, mean_loss, shard_model, tiny_llama
from tpsp_sim.data_parallel import unreduced


def accumulate(comm, model, rows, strategy, last_syncs, update="optimizer"):
    """Two micro-batches, the last one reduced only if ``last_syncs``; then an AdamW step (``update`` =
    "optimizer"), an update by hand followed by the next step's forward ("by hand") or nothing ("none"); the
    names of the parameters left marked as unreduced."""
    net, opt, ddp = shard_model(copy.deepcopy(model), comm, strategy)
    for m in range(2):
        syncs = last_syncs and m == 1
        if strategy == "fsdp":
            net.set_requires_gradient_sync(syncs)
        with (ddp.no_sync() if ddp is not None and not syncs else torch.enable_grad()):
            mean_loss(net, rows.chunk(comm.world_size)[comm.rank]).backward()
    if update == "optimizer":
        opt.step()
    elif update == "by hand":
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(0.9)  # weight decay by hand: needs no gradient, so it runs on unreduced ones too
        mean_loss(net, rows.chunk(comm.world_size)[comm.rank])
    module = net if ddp is None else ddp.module
    return sorted(n for n, p in module.named_parameters() if p in unreduced._UNREDUCED)


@pytest.mark.parametrize("strategy, fix", [("ddp", r"outside no_sync\(\)"),
                                           ("fsdp", r"set_requires_gradient_sync\(True\) before the last")])
def test_an_optimizer_step_on_unreduced_gradients_names_rank_and_parameter(strategy, fix):
    model, rows = tiny_llama(n_layers=1), batches(1, 1, 4)[0, 0]
    with pytest.raises(ts.RankFailedError, match=rf"rank [01]: optimizer step on [\w.]+, whose gradient was never "
                                                 rf"reduced.*{fix}") as error:
        ts.run(accumulate, model, rows, strategy, False, world_size=2)
    assert str(error.value).split("optimizer step on ")[1].split(",")[0] in dict(model.named_parameters())


@pytest.mark.parametrize("strategy, match", [("ddp", "parameters changed .* never reduced"),
                                             ("fsdp", r"parameter [\w.]+ changed while its gradient was never reduced")])
def test_an_update_by_hand_on_unreduced_gradients_fails_at_the_next_forward(strategy, match):
    model, rows = tiny_llama(n_layers=1), batches(1, 1, 4)[0, 0]
    with pytest.raises(ts.RankFailedError, match=rf"rank [01]: {match}"):
        ts.run(accumulate, model, rows, strategy, False, "by hand", world_size=2)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_the_final_reduction_clears_every_mark(strategy):
    """Accumulated correctly (the last backward reduces), the step runs and no parameter stays marked."""
    model, rows = tiny_llama(n_layers=1), batches(1, 1, 4)[0, 0]
    res = ts.run(accumulate, model, rows, strategy, True, world_size=2)
    assert res.outputs == [[], []]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_unreduced_parameter_is_marked_by_its_model_name(strategy):
    """After backwards that never reduce, every parameter is marked, named as the model names it (FSDP: the
    block's name in the root, then the parameter's)."""
    model, rows = tiny_llama(n_layers=2), batches(1, 1, 4)[0, 0]
    res = ts.run(accumulate, model, rows, strategy, False, "none", world_size=2)
    assert res.outputs == [sorted(n for n, _ in model.named_parameters())] * 2
