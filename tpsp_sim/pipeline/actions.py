"""A pipeline schedule is a program per rank: a list of actions, each F, B or W of one micro-batch on one chunk.

``F`` runs a micro-batch forward through the rank's stage (chunk ``c`` of the rank holds stage
``c·p + rank``: Megatron's and torch's looped placement); ``B`` runs its backward — the whole
backward, or only the input gradient when the program also has a ``W`` for that micro-batch and
chunk (zero-bubble schedules, Qi et al. 2023); ``W`` then computes the weight gradients.

Written as text, an action is ``F3`` (micro-batch 3, chunk 0) or ``B3.1`` (chunk 1)::

    {0: "F0 F1 B0 B1", 1: "F0 B0 F1 B1"}        # parse_program gives {rank: [Action, ...]}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

KINDS = ("F", "B", "W")
_TEXT = re.compile(r"([FBW])(\d+)(?:\.(\d+))?")


@dataclass(frozen=True, order=True)
class Action:
    """One step of a rank's program: ``kind`` "F" | "B" | "W" of ``microbatch`` on the rank's chunk ``chunk``."""

    kind: str
    microbatch: int
    chunk: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Action: kind must be one of {KINDS}, got {self.kind!r}")
        if self.microbatch < 0 or self.chunk < 0:
            raise ValueError(f"Action: microbatch and chunk must be >= 0, got {self.microbatch} and {self.chunk}")

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")

    __repr__ = __str__

    @classmethod
    def parse(cls, text: str) -> "Action":
        """``"F3"`` → F of micro-batch 3 on chunk 0; ``"B3.1"`` → B on chunk 1."""
        found = _TEXT.fullmatch(text.strip())
        if not found:
            raise ValueError(f"Action.parse: {text!r} is not an action like 'F3', 'B0' or 'W2.1' (kind, micro-batch, .chunk)")
        return cls(found[1], int(found[2]), int(found[3] or 0))


Program = dict[int, list[Action]]


def parse_program(program: Mapping[int, str | Sequence[Action | str]]) -> Program:
    """{rank: actions} from actions or their text (``"F0 F1 B0 B1"`` or ``["F0", Action("B", 0)]``)."""
    parsed = {}
    for rank, actions in program.items():
        items = actions.split() if isinstance(actions, str) else actions
        parsed[int(rank)] = [a if isinstance(a, Action) else Action.parse(a) for a in items]
    return parsed


def format_program(program: Mapping[int, Sequence[Action]]) -> str:
    """One line per rank: ``rank 0: F0 F1 B0 B1``."""
    return "\n".join(f"rank {r}: " + " ".join(map(str, program[r])) for r in sorted(program))


def stage_of(rank: int, chunk: int, p: int) -> int:
    """The stage chunk ``chunk`` of rank ``rank`` holds on a pipeline of ``p`` ranks (looped placement)."""
    return chunk * p + rank


def rank_of(stage: int, p: int) -> tuple[int, int]:
    """(rank, chunk) holding ``stage``."""
    return stage % p, stage // p
