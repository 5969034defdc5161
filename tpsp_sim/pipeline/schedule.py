"""The runtime every schedule shares: split the batch, run this rank's program, send and receive between stages.

A schedule class only says its program (``make_program(p, m, v)``) and its closed forms
(``bubble_fraction``, ``in_flight``); ``PipelineSchedule`` runs any program, also one a user passes
(``program={rank: "F0 F1 B0 B1", ...}``). Built as torch.distributed.pipelining's::

    schedule = Schedule1F1B(stage, n_microbatches, loss_fn=loss_fn)   # or a list of stages (interleaved)
    schedule.step(x)                                 # first stage: the whole batch, split along dim 0
    schedule.step(target=y, losses=losses)           # last stage: returns the outputs, appends each loss
    schedule.step()                                  # stages in between

Every rank checks the program first (``dry_run``): a program that would deadlock raises
``DeadlockError`` naming each waiting rank and action before anything is sent.

Communication, per micro-batch and boundary: F sends the activation forward, B the gradient of the
stage's input backward, both ``isend`` (waited for at the end of the step) and received with a
blocking ``recv``, on ``comm`` (axis "pp" on a mesh), under scope ``stage{s}/F{k}`` (``B{k}``) of the receiving
or sending stage s, phase "forward" or "backward". Bytes per boundary per micro-batch: s·b·h·dtype
each way for a [b, s, h] activation — the micro-batch's b = batch / n_microbatches. Before stage s's
first activation of a step, a 10-number int64 header (80 bytes: dtype, rank, shape) tells stage
s+1 what to allocate (scope ``stage{s}/F{k}/shapes``; torch's stage infers shapes the same way, once).

Gradients are those of the mean of the micro-batches' losses (torch's ``scale_grads=True``): each
loss is back-propagated times 1 / n_microbatches; ``losses`` gets the unscaled losses.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Mapping, Sequence

import torch

from ..core.comm import Work
from .actions import Action, Program, format_program, parse_program, rank_of
from .dry_run import Slot, dry_run
from .stage import PipelineStage

HEADER = 10  # dtype, rank, up to 8 dims
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32)


class PipelineSchedule:
    """Runs a program of F / B / W actions on this rank's stages (subclasses give the program)."""

    multi_stage = False  # True: several stages per rank (v > 1)

    def __init__(self, stage_or_stages: PipelineStage | Sequence[PipelineStage], n_microbatches: int,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, *,
                 program: Mapping[int, str | Sequence[Action | str]] | None = None) -> None:
        stages = [stage_or_stages] if isinstance(stage_or_stages, PipelineStage) else list(stage_or_stages)
        name = type(self).__name__
        if not stages or not all(isinstance(s, PipelineStage) for s in stages):
            raise ValueError(f"{name}: needs a PipelineStage or a list of them, got {stage_or_stages!r}")
        if not isinstance(n_microbatches, int) or n_microbatches < 1:
            raise ValueError(f"{name}: n_microbatches={n_microbatches!r} must be a positive integer")
        self.comm, self.num_stages = stages[0].comm, stages[0].num_stages
        self.p, self.v, self.n_microbatches = self.comm.world_size, self.num_stages // self.comm.world_size, n_microbatches
        chunks = sorted(s.chunk for s in stages)
        if chunks != list(range(self.v)) or any(s.comm is not self.comm or s.num_stages != self.num_stages for s in stages):
            raise ValueError(f"{name}: rank {self.comm.rank} needs its {self.v} stages "
                             f"{[c * self.p + self.comm.rank for c in range(self.v)]} on one comm, got stages "
                             f"{sorted(s.stage_index for s in stages)}")
        if self.v > 1 and not self.multi_stage and program is None:
            raise ValueError(f"{name} runs one stage per rank, rank {self.comm.rank} got {self.v} (num_stages="
                             f"{self.num_stages} on {self.p} ranks): use ScheduleInterleaved1F1B")
        if any(s.is_last for s in stages) and loss_fn is None:
            raise ValueError(f"{name}: the last stage ({self.num_stages - 1}, on rank {self.comm.rank}) needs a loss_fn")
        self.stages = {s.chunk: s for s in stages}
        self.loss_fn = loss_fn
        self.program: Program = parse_program(program) if program is not None else self.make_program(
            self.p, n_microbatches, self.v)
        self.slots: list[Slot] = dry_run(self.program, self.p, self.v, n_microbatches)  # checked before it runs
        self._split_backward = {(a.microbatch, a.chunk) for a in self.program[self.comm.rank] if a.kind == "W"}  # B then W
        self.peak_saved_bytes = 0  # this rank's peak of activation bytes in flight, over its stages, last step

    @staticmethod
    def make_program(p: int, m: int, v: int = 1) -> Program:
        raise ValueError("PipelineSchedule: pass program={rank: actions}, or use a schedule class")

    def __str__(self) -> str:
        return f"{type(self).__name__}, {self.p} ranks × {self.v} chunks, {self.n_microbatches} micro-batches\n" + \
            format_program(self.program)

    # ---- one step ---------------------------------------------------------------------------------

    def step(self, *args: torch.Tensor, target: torch.Tensor | None = None,
             losses: list | None = None) -> torch.Tensor | None:
        """Run this rank's program on one batch; the last stage returns its outputs, concatenated."""
        first, last = self.stages[0].is_first, self.stages[self.v - 1].is_last
        name = type(self).__name__
        if first != bool(args) or len(args) > 1:
            raise ValueError(f"{name}.step on rank {self.comm.rank}: the first stage takes the batch as its one "
                             f"argument, the others none; got {len(args)} (stages {self._stage_list()})")
        if last and target is None:
            raise ValueError(f"{name}.step on rank {self.comm.rank}: the last stage needs target= for loss_fn")
        self._xs = self._split(args[0], "the batch (step's argument)") if first else None
        self._ys = self._split(target, "target") if last else None
        self._sends: list[Work] = []
        self._local: deque = deque()  # p == 1: stage s hands stage s+1 its tensors directly
        self._shapes: dict[int, tuple] = {}
        self._sent_header: set[int] = set()
        self._outputs: dict[int, torch.Tensor] = {}
        self._losses: dict[int, torch.Tensor] = {}
        self.peak_saved_bytes = 0
        for s in self.stages.values():
            s.reset()
        for action in self.program[self.comm.rank]:
            stage = self.stages[action.chunk]
            with self.comm.scope(f"stage{stage.stage_index}"), self.comm.scope(str(Action(action.kind, action.microbatch))):
                {"F": self._forward, "B": self._backward, "W": self._weight}[action.kind](stage, action)
        for work in self._sends:
            work.wait()
        if losses is not None and last:
            losses.extend(self._losses[k] for k in range(self.n_microbatches))
        return torch.cat([self._outputs[k] for k in range(self.n_microbatches)]) if last else None

    def _forward(self, stage: PipelineStage, a: Action) -> None:
        k = a.microbatch
        x = self._xs[k] if stage.is_first else self._receive_activation(stage.stage_index - 1)
        if stage.is_last:
            self._outputs[k] = stage.forward_one(k, x, lambda y: self.loss_fn(y, self._ys[k])).detach()
            self._losses[k] = stage.kept(k).detach()
        else:
            y = stage.forward_one(k, x)
            self._send(y.detach(), stage.stage_index + 1, header=stage.stage_index not in self._sent_header)
            self._sent_header.add(stage.stage_index)
        self.peak_saved_bytes = max(self.peak_saved_bytes, sum(s.live_bytes() for s in self.stages.values()))

    def _backward(self, stage: PipelineStage, a: Action) -> None:
        k = a.microbatch
        with self.comm.phase("backward"):
            grad = None if stage.is_last else self._receive(stage.kept(k), stage.stage_index + 1)
            dx = stage.backward_one(k, grad, 1 / self.n_microbatches, split=(k, a.chunk) in self._split_backward)
            if not stage.is_first:
                self._send(dx, stage.stage_index - 1)

    def _weight(self, stage: PipelineStage, a: Action) -> None:
        with self.comm.phase("backward"):
            stage.backward_weight(a.microbatch)

    # ---- between stages -------------------------------------------------------------------------

    def _split(self, x: torch.Tensor, what: str) -> list[torch.Tensor]:
        m = self.n_microbatches
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] % m:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}.step on rank {self.comm.rank}: {what} of shape {shape} does "
                             f"not split into n_microbatches={m} equal micro-batches along dim 0")
        return [c.clone() for c in x.chunk(m)]  # own storages: each micro-batch's saved input is its own

    def _send(self, x: torch.Tensor, to_stage: int, header: bool = False) -> None:
        dst = rank_of(to_stage, self.p)[0]
        if dst == self.comm.rank:
            self._local.append(x)
            return
        if header:
            with self.comm.scope("shapes"):
                self._sends.append(self.comm.isend(_header(x), dst))
        self._sends.append(self.comm.isend(x, dst))

    def _receive_activation(self, from_stage: int) -> torch.Tensor:
        src = rank_of(from_stage, self.p)[0]
        if src == self.comm.rank:
            return self._local.popleft()
        if from_stage not in self._shapes:
            with self.comm.scope("shapes"):
                self._shapes[from_stage] = _read_header(self.comm.recv(torch.zeros(HEADER, dtype=torch.int64), src))
        shape, dtype = self._shapes[from_stage]
        return self.comm.recv(torch.empty(shape, dtype=dtype), src)

    def _receive(self, like: torch.Tensor, from_stage: int) -> torch.Tensor:
        src = rank_of(from_stage, self.p)[0]
        return self._local.popleft() if src == self.comm.rank else self.comm.recv(like, src)

    def _stage_list(self) -> list[int]:
        return sorted(s.stage_index for s in self.stages.values())


def _header(x: torch.Tensor) -> torch.Tensor:
    if x.dim() > HEADER - 2 or x.dtype not in DTYPES:
        raise ValueError(f"pipeline: a stage output of shape {tuple(x.shape)} and {x.dtype} cannot be sent "
                         f"(at most {HEADER - 2} dims, dtype one of {DTYPES})")
    return torch.tensor([DTYPES.index(x.dtype), x.dim(), *x.shape] + [0] * (HEADER - 2 - x.dim()), dtype=torch.int64)


def _read_header(h: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    values = h.tolist()
    return tuple(values[2:2 + values[1]]), DTYPES[values[0]]
