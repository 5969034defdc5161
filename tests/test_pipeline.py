"""Pipeline parallelism: every schedule exact against the dense model with gradient accumulation
(float64, 1e-10), its bytes against the closed form, its mistakes caught (ValueError, DeadlockError)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tpsp_sim as ts
from tpsp_sim.pipeline import (Action, PipelineSchedule, dry_run, format_program, layer_ranges, parse_program,
                               sent_bytes, stage_module)

SCHEDULES = [ts.ScheduleGPipe, ts.Schedule1F1B, ts.ScheduleInterleaved1F1B, ts.ScheduleZBH1]


def tiny_llama(n_layers: int) -> ts.TinyLlama:
    torch.manual_seed(0)
    return ts.TinyLlama(vocab=11, d_model=8, n_layers=n_layers, n_heads=2).double()


def llama_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def dense_grads(model: nn.Module, loss_of, xs, ys) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Gradient accumulation over the same micro-batches: the gradient of the mean micro-batch loss."""
    model = copy.deepcopy(model)
    losses = []
    for x, y in zip(xs, ys):
        loss = loss_of(model, x, y)
        (loss / len(xs)).backward()
        losses.append(loss.detach())
    return {n: q.grad for n, q in model.named_parameters()}, losses


def run_pipeline(model, blocks_of, first_of, last_of, loss_fn, schedule, p, m, x, y, *, v=None, sizes=None,
                 program=None):
    """Split ``model`` into v·p stages on p virtual ranks; return (grads by name, losses, the run)."""
    v = v or (2 if schedule.multi_stage else 1)
    num_stages = v * p

    def fn(comm):
        mine = copy.deepcopy(model)
        stages = [ts.PipelineStage(stage_module(blocks_of(mine), s, num_stages, first=first_of(mine),
                                                last=last_of(mine), sizes=sizes), s, num_stages, comm)
                  for s in range(comm.rank, num_stages, p)]
        sched = schedule(stages if v > 1 else stages[0], m, loss_fn=loss_fn, program=program)
        losses = []
        kwargs = {"target": y, "losses": losses} if comm.rank == (num_stages - 1) % p else {}
        out = sched.step(*([x] if comm.rank == 0 else []), **kwargs)
        return {n: q.grad for n, q in mine.named_parameters() if q.grad is not None}, losses, out

    res = ts.run(fn, world_size=p)
    grads = {}
    for g, _, _ in res.outputs:
        assert not set(g) & set(grads), "a parameter got a gradient on two ranks"
        grads.update(g)
    losses = next(out[1] for out in res.outputs if out[1])
    return grads, losses, res


def assert_close(grads, ref, tol=1e-10):
    assert set(grads) == set(ref)
    for name, g in ref.items():
        assert torch.allclose(grads[name], g, atol=tol, rtol=0), name


def llama_case(p: int, v: int, m: int, seed: int = 0):
    model = tiny_llama(2 * p * v)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 11, (2 * m, 5), generator=gen)
    targets = torch.randint(0, 11, (2 * m, 5), generator=gen)
    return model, tokens, targets


def run_llama(schedule, p, m, seed=0):
    v = 2 if schedule.multi_stage else 1
    model, tokens, targets = llama_case(p, v, m, seed)
    ref, ref_losses = dense_grads(model, lambda mod, x, y: mod.loss(x, y), tokens.chunk(m), targets.chunk(m))
    grads, losses, res = run_pipeline(model, lambda mod: mod.blocks, lambda mod: mod.embed,
                                      lambda mod: nn.Sequential(mod.norm, mod.head), llama_loss, schedule, p, m,
                                      tokens, targets)
    assert_close(grads, ref)
    assert torch.allclose(torch.stack(losses), torch.stack(ref_losses), atol=1e-12, rtol=0)
    return res


FAST = [(ts.ScheduleGPipe, 2, 3), (ts.Schedule1F1B, 3, 5), (ts.ScheduleInterleaved1F1B, 2, 4), (ts.ScheduleZBH1, 3, 3)]


@pytest.mark.parametrize("schedule,p,m", FAST, ids=lambda a: getattr(a, "__name__", a))
def test_tiny_llama_is_exact(schedule, p, m):
    run_llama(schedule, p, m)


def microbatch_counts(schedule, p):
    """1, p, 2p and an odd count; interleaved needs m >= p in equal rounds: the first odd count above p."""
    odd = p + 1 if p % 2 == 0 else p + 2
    return [p, 2 * p, odd] if schedule.multi_stage else [1, p, 2 * p, 2 * p + 1]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.__name__)
@pytest.mark.parametrize("p", [2, 3, 4])
def test_tiny_llama_is_exact_for_every_microbatch_count(schedule, p):
    for m in microbatch_counts(schedule, p):
        run_llama(schedule, p, m, seed=m)


def gpt_stack(n_layers: int) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(*[ts.TransformerBlock(8, 2) for _ in range(n_layers)]).double()


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def run_gpt(schedule, p, m, n_layers, sizes=None, program=None, b=2, s=3):
    model = gpt_stack(n_layers)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(b * m, s, 8, generator=gen, dtype=torch.float64)
    y = torch.randn(b * m, s, 8, generator=gen, dtype=torch.float64)
    ref, _ = dense_grads(model, lambda mod, a, t: mse(mod(a), t), x.chunk(m), y.chunk(m))
    grads, _, res = run_pipeline(model, list, lambda mod: None, lambda mod: None, mse, schedule, p, m, x, y,
                                 sizes=sizes, program=program)
    assert_close(grads, ref)
    return res


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.__name__)
def test_gpt_stack_is_exact_and_sends_sbh_per_boundary_per_microbatch(schedule):
    """Per boundary and micro-batch, forward: one activation of s·b·h·8 bytes; backward: its gradient, the same.
    Plus one 80-byte shape header per boundary per step (10 int64)."""
    p, m, b, s, h = 3, 4, 2, 3, 8
    v = 2 if schedule.multi_stage else 1
    res = run_gpt(schedule, p, m, p * v, b=b, s=s)
    boundaries = p * v - 1
    act = s * b * h * 8
    tr = res.trace
    assert tr.total("sent_bytes", op="send", phase="forward") == boundaries * (m * act + 80)
    assert tr.total("sent_bytes", op="send", phase="backward") == boundaries * m * act
    assert tr.total("recv_bytes", op="recv") == tr.total("sent_bytes", op="send")
    assert tr.ops() == {"send": boundaries * (2 * m + 1), "recv": boundaries * (2 * m + 1)}
    assert list(tr.per_rank("sent_bytes", op="send").values()) == sent_bytes(p, m, v, act)
    sends = tr.filter(op="send", phase="forward", scope="stage0/F1").events  # scope: stage, action, micro-batch
    assert len(sends) == 1 and sends[0].sent_bytes == act and sends[0].rank == 0 and sends[0].peer == 1


def test_uneven_split_and_two_stages_on_one_rank():
    run_gpt(ts.Schedule1F1B, 3, 3, 5, sizes=(2, 2, 1))
    run_gpt(ts.ScheduleInterleaved1F1B, 1, 2, 4)  # p = 1: two chunks on one rank hand over without communication


def test_one_rank_and_three_chunks_per_rank():
    run_gpt(ts.ScheduleGPipe, 1, 3, 2)  # p = 1: first and last stage on one rank, step(x, target=y)
    model = gpt_stack(9)
    x, y = torch.randn(2, 6, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).unbind(0)
    ref, _ = dense_grads(model, lambda mod, a, t: mse(mod(a), t), x.chunk(3), y.chunk(3))
    grads, _, _ = run_pipeline(model, list, lambda mod: None, lambda mod: None, mse, ts.ScheduleInterleaved1F1B,
                               3, 3, x, y, v=3)  # v = 3 chunks on each of 3 ranks
    assert_close(grads, ref)


def test_a_users_own_program_runs_exactly():
    program = {0: "F0 F1 B0 B1", 1: "F0 B0 F1 B1"}
    res = run_gpt(PipelineSchedule, 2, 2, 2, program=program)
    assert res.trace.count(op="send") == 2 * 2 + 1


def test_programs_print_and_parse_back():
    program = ts.Schedule1F1B.make_program(3, 4)
    text = format_program(program)
    assert text.splitlines()[0] == "rank 0: F0 F1 F2 B0 F3 B1 B2 B3"
    assert text.splitlines()[2] == "rank 2: F0 B0 F1 B1 F2 B2 F3 B3"
    assert parse_program({r: line.split(": ")[1] for r, line in enumerate(text.splitlines())}) == program
    assert str(Action("W", 3, 1)) == "W3.1" and Action.parse("B12.1") == Action("B", 12, 1)
    assert ts.ScheduleZBH1.make_program(2, 2)[0] == [Action(k, mb) for k, mb in
                                                     [("F", 0), ("F", 1), ("B", 0), ("W", 0), ("B", 1), ("W", 1)]]


def test_a_wrong_1f1b_order_is_a_deadlock_naming_ranks_and_actions():
    """Stage 0 without its warm-up waits for B0's gradient while stage 1 waits for F1's activation."""
    wrong = {0: "F0 B0 F1 B1", 1: "F0 F1 B0 B1"}
    with pytest.raises(ts.DeadlockError, match=r"rank 0 at B0 .*gradient of micro-batch 0; rank 1 at F1 .*"
                                               r"activation of micro-batch 1"):
        dry_run(parse_program(wrong), 2, 1, 2)

    def fn(comm):
        stage = ts.PipelineStage(nn.Linear(2, 2), comm.rank, 2, comm)
        PipelineSchedule(stage, 2, loss_fn=mse, program=wrong)

    with pytest.raises(ts.DeadlockError, match="rank 0 at B0"):
        ts.run(fn, world_size=2, timeout=20)


def test_messages_out_of_order_are_named_with_both_ranks():
    with pytest.raises(ValueError, match=r"rank 1's F1 \(stage 1\) receives stage 0's activation of micro-batch 1, "
                                         r"but the next message rank 0 sends it is stage 0's activation of micro-batch 0"):
        dry_run(parse_program({0: "F0 F1 B0 B1", 1: "F1 F0 B0 B1"}), 2, 1, 2)


@pytest.mark.parametrize("program,match", [
    ({0: "F0 B0", 1: "F0 B0"}, r"rank 0 runs F1 0 times, not once"),
    ({0: "B0 F0 F1 B1", 1: "F0 B0 F1 B1"}, r"rank 0 runs B0 before F0"),
    ({0: "F0 F1 B0 B1 W0 W0", 1: "F0 B0 F1 B1"}, r"rank 0 runs W0 2 times, not at most once"),
    ({0: "F0 F1 B0 B1 F2 B2"}, r"one action list per rank 0 .. 1"),
])
def test_malformed_programs_are_value_errors(program, match):
    with pytest.raises(ValueError, match=match):
        dry_run(parse_program(program), 2, 1, 2)


def test_layer_split_errors_name_the_argument():
    assert layer_ranges(6, 3) == [range(0, 2), range(2, 4), range(4, 6)]
    with pytest.raises(ValueError, match="num_stages=4 does not divide the 6 layers"):
        layer_ranges(6, 4)
    with pytest.raises(ValueError, match=r"sizes=\(3, 2\) must be 2 non-negative numbers adding up to the 6 layers"):
        layer_ranges(6, 2, sizes=(3, 2))


def run_errors(fn, world_size=2):
    return ts.run(fn, world_size=world_size, timeout=20)


def test_bad_schedule_arguments_are_value_errors():
    def interleaved_too_few(comm):
        stages = [ts.PipelineStage(nn.Linear(2, 2), s, 4, comm) for s in (comm.rank, comm.rank + 2)]
        ts.ScheduleInterleaved1F1B(stages, 1, loss_fn=mse)

    with pytest.raises(ValueError, match="n_microbatches=1 must be at least the pipeline's 2 ranks"):
        run_errors(interleaved_too_few)

    def no_loss(comm):
        ts.Schedule1F1B(ts.PipelineStage(nn.Linear(2, 2), comm.rank, 2, comm), 2)

    with pytest.raises(ValueError, match=r"the last stage \(1, on rank 1\) needs a loss_fn"):
        run_errors(no_loss)

    def wrong_rank(comm):
        ts.PipelineStage(nn.Linear(2, 2), 1 - comm.rank, 2, comm)

    # whichever rank raises first: rank r was given stage 1 - r
    with pytest.raises(ValueError, match=r"stage_index=(1 lives on rank 1|0 lives on rank 0) of the pipeline "
                                         r"\(stage mod 2\), not on rank (0|1)"):
        run_errors(wrong_rank)

    def two_stages_for_1f1b(comm):
        ts.Schedule1F1B([ts.PipelineStage(nn.Linear(2, 2), s, 4, comm) for s in (comm.rank, comm.rank + 2)], 2,
                        loss_fn=mse)

    with pytest.raises(ValueError, match=r"Schedule1F1B runs one stage per rank, rank [01] got 2"):
        run_errors(two_stages_for_1f1b)


LINEARS = ((2, 2), (2, 2))  # (in, out) features of stage 0's and stage 1's Linear
MISMATCHED = ((2, 3), (2, 4))  # stage 0 outputs 3 features, stage 1 takes 2


@pytest.mark.parametrize("m,linears,with_target,match", [
    (3, LINEARS, True, r"of shape \(4, 2\) does not split into n_microbatches=3"),
    (2, MISMATCHED, True, r"PipelineStage 1: its submodule cannot take stage 0's output \(shape \(2, 3\)"),
    (2, LINEARS, False, "the last stage needs target="),
])
def test_a_batch_that_does_not_split_mismatched_stage_shapes_and_no_target(m, linears, with_target, match):
    def fn(comm):
        stage = ts.PipelineStage(nn.Linear(*linears[comm.rank]).double(), comm.rank, 2, comm)
        sched = ts.ScheduleGPipe(stage, m, loss_fn=mse)
        if comm.rank == 0:
            sched.step(torch.zeros(4, linears[0][0], dtype=torch.float64))
        else:
            target = torch.zeros(4, linears[1][1], dtype=torch.float64)
            sched.step(**({"target": target} if with_target else {}))

    with pytest.raises(ValueError, match=match):
        run_errors(fn)
