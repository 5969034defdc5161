"""Run a pipeline program without tensors: check it, time it in units of F / B / W, or name its deadlock.

Every rank executes its actions in order. ``F`` of a stage after the first waits for the previous
stage's activation of that micro-batch, ``B`` of a stage before the last for the next stage's
gradient; the results are sent at once (an ``isend``: sending never blocks). Messages between two
ranks arrive in the order they were sent (point-to-point calls pair up in order, as on NCCL), so a
rank waiting for one message while another one is first on that link is a program error, not a
race. When no rank can move, the program deadlocks: ``DeadlockError`` names each waiting rank, its
action, and what it waits for. The runtime (``schedule.py``) runs the same semantics with tensors,
and checks every program here first, so a wrong program never hangs a run (on gloo it would).

Times: an action starts when its rank is free and its message has arrived, and takes ``costs[kind]``
(default F = B = W = 1; a B whose micro-batch has no W is the whole backward, B + W); transfers take 0.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..core.errors import DeadlockError
from .actions import Action, rank_of, stage_of

DEFAULT_COSTS = {"F": 1.0, "B": 1.0, "W": 1.0}


@dataclass(frozen=True)
class Slot:
    """One action of one rank, placed in time."""

    rank: int
    action: Action
    stage: int
    start: float
    end: float


def check_program(program: Mapping[int, Sequence[Action]], p: int, v: int, m: int) -> None:
    """ValueError unless each rank runs F and B exactly once per micro-batch and chunk (W at most once), F
    before B before W, on ranks 0 .. p-1, chunks 0 .. v-1 and micro-batches 0 .. m-1."""
    if sorted(program) != list(range(p)):
        raise ValueError(f"pipeline program: needs one action list per rank 0 .. {p - 1}, got ranks {sorted(program)}")
    for rank, actions in program.items():
        seen = Counter()
        for a in actions:
            if a.chunk >= v or a.microbatch >= m:
                raise ValueError(f"pipeline program: rank {rank}'s {a} is outside chunks 0 .. {v - 1} and "
                                 f"micro-batches 0 .. {m - 1}")
            before = {"F": None, "B": "F", "W": "B"}[a.kind]
            if before and not seen[before, a.microbatch, a.chunk]:
                raise ValueError(f"pipeline program: rank {rank} runs {a} before {Action(before, a.microbatch, a.chunk)}")
            seen[a.kind, a.microbatch, a.chunk] += 1
        for kind, mb, c in [(k, mb, c) for k in "FBW" for c in range(v) for mb in range(m)]:
            if seen[kind, mb, c] != 1 and (kind != "W" or seen[kind, mb, c] > 1):
                raise ValueError(f"pipeline program: rank {rank} runs {Action(kind, mb, c)} {seen[kind, mb, c]} "
                                 f"times, not {'at most ' if kind == 'W' else ''}once")


def dry_run(program: Mapping[int, Sequence[Action]], p: int, v: int, m: int,
            costs: Mapping[str, float] | None = None) -> list[Slot]:
    """Every action of ``program`` (``p`` ranks, ``v`` chunks each, ``m`` micro-batches) placed in time;
    ``check_program``'s ValueError, a ValueError for messages received out of order, or a ``DeadlockError``."""
    check_program(program, p, v, m)
    costs = {**DEFAULT_COSTS, **(costs or {})}
    split = {(r, a.microbatch, a.chunk) for r, acts in program.items() for a in acts if a.kind == "W"}
    last = p * v - 1
    links: dict[tuple[int, int], deque] = {}  # (src, dst) -> [(message, time it is there)]
    at, clock, slots = dict.fromkeys(program, 0), dict.fromkeys(program, 0.0), []
    while True:
        moved = False
        for r, actions in program.items():
            while at[r] < len(actions):
                a = actions[at[r]]
                s = stage_of(r, a.chunk, p)
                needs = _needs(a, s, last)
                ready = clock[r]
                if needs is not None:
                    link = links.setdefault((rank_of(needs[1], p)[0], r), deque())
                    if not link:
                        break
                    if link[0][0] != needs:
                        raise ValueError(f"pipeline program: rank {r}'s {a} (stage {s}) receives {_name(needs)}, but "
                                         f"the next message rank {rank_of(needs[1], p)[0]} sends it is "
                                         f"{_name(link[0][0])}: both ranks must send and receive in the same order")
                    ready = max(ready, link.popleft()[1])
                cost = costs[a.kind] + (costs["W"] if a.kind == "B" and (r, a.microbatch, a.chunk) not in split else 0)
                slots.append(Slot(r, a, s, ready, ready + cost))
                clock[r] = ready + cost
                sent = _sends(a, s, last)
                if sent is not None:
                    links.setdefault((r, rank_of(sent[3], p)[0]), deque()).append((sent[:3], clock[r]))
                at[r] += 1
                moved = True
        if all(at[r] == len(actions) for r, actions in program.items()):
            return slots
        if not moved:
            waiting = []
            for r, actions in program.items():
                if at[r] < len(actions):
                    a, s = actions[at[r]], stage_of(r, actions[at[r]].chunk, p)
                    waiting.append(f"rank {r} at {a} (stage {s}) waits for {_name(_needs(a, s, last))}")
            raise DeadlockError("pipeline program deadlocks: every unfinished rank waits for a message no rank will "
                                "send: " + "; ".join(waiting))


def _needs(a: Action, stage: int, last: int) -> tuple[str, int, int] | None:
    """The message action ``a`` on ``stage`` waits for: (what, the stage that sends it, micro-batch)."""
    if a.kind == "F" and stage > 0:
        return ("activation", stage - 1, a.microbatch)
    if a.kind == "B" and stage < last:
        return ("gradient", stage + 1, a.microbatch)
    return None


def _sends(a: Action, stage: int, last: int) -> tuple[str, int, int, int] | None:
    """(what, this stage, micro-batch, the stage it goes to) that ``a`` sends, if any."""
    if a.kind == "F" and stage < last:
        return ("activation", stage, a.microbatch, stage + 1)
    if a.kind == "B" and stage > 0:
        return ("gradient", stage, a.microbatch, stage - 1)
    return None


def _name(message: tuple[str, int, int]) -> str:
    what, stage, mb = message
    return f"stage {stage}'s {what} of micro-batch {mb}"


def bubble(slots: Sequence[Slot]) -> dict[int, float]:
    """{rank: the fraction of the makespan it is idle}: 1 - its busy time / the last action's end."""
    end = max(s.end for s in slots)
    busy = Counter()
    for s in slots:
        busy[s.rank] += s.end - s.start
    return {r: 1 - busy[r] / end for r in sorted(busy)}
