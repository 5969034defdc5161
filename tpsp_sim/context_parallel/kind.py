"""What a context-parallel attention kind declares, so the rest of the package needs nothing else.

A kind runs on up to two communicators of the cp group, named by their role: ``ulysses`` (an
all-to-all over heads; size u) and ``ring`` (the group the sequence is cut over by ``layout``; size
r), u · r = cp. Ring attention and Llama 3's all-gather use only ``ring``, Ulysses only ``ulysses``,
USP both. A rank's tokens are then always ``usp_shard_sequence``'s: its ring shard (``layout``),
contiguous over the Ulysses group — which is how the hybrid block shards the residual stream.

Every formula is per rank and takes ``LocalShape``, the rank's attention input before the kind's
collectives: q [batch, q_heads, tokens, head_dim] and k, v [batch, kv_heads, tokens, head_dim] (its
piece of s/cp tokens, for its tensor-parallel heads). The trace checks the bytes
(tests/test_attention_kinds.py); the planner, the memory budget and the sweep read the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..core.comm import Comm

GROUPS = ("ulysses", "ring")


@dataclass(frozen=True)
class LocalShape:
    """One rank's attention input: q [batch, q_heads, tokens, head_dim], k and v [batch, kv_heads, tokens, head_dim]."""

    batch: int
    q_heads: int
    kv_heads: int
    tokens: int
    head_dim: int
    elem: int = 2  # bytes of an input element
    acc: int = 4  # bytes of an accumulation element (float32 for 16-bit inputs, else = elem)

    @property
    def q_elems(self) -> int:
        return self.batch * self.q_heads * self.tokens * self.head_dim

    @property
    def kv_elems(self) -> int:
        """Elements of K (= of V)."""
        return self.batch * self.kv_heads * self.tokens * self.head_dim


class Attend(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ulysses: Comm | None,
                 ring: Comm | None, causal: bool, layout: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class AttentionKind:
    """One context-parallel attention: how it runs and what it costs (module docstring)."""

    name: str
    summary: str  # one line, with its paper
    groups: tuple[str, ...]  # the communicators it uses, of GROUPS, in GROUPS order
    attend: Attend
    # (shape, u, r) -> {(group, phase): bytes one rank sends (= receives)}, a closed form checked by the trace
    wire_bytes: Callable[[LocalShape, int, int], dict[tuple[str, str], int]]
    # (shape, u, r, layout) -> (forward, backward) FLOPs the simulator's kernels count on the meta device
    # (where the planner simulates) beyond a causal flash kernel that skips masked halves; the planner
    # takes them off the compute
    causal_excess: Callable[[LocalShape, int, int, str], tuple[float, float]]
    # (shape, u, r) -> bytes it keeps for backward beyond its own q, k, v, out and lse (memory budget)
    extra_saved_bytes: Callable[[LocalShape, int, int], int]
    # (shape, u, r, layout) -> why these sizes cannot run, or None
    problem: Callable[[LocalShape, int, int, str], str | None]

    def __post_init__(self) -> None:
        if not self.groups or [g for g in GROUPS if g in self.groups] != list(self.groups):
            raise ValueError(f"attention kind {self.name!r}: groups must be some of {GROUPS} in that order, "
                             f"got {self.groups}")

    def sizes(self, cp: int, ulysses: int = 1) -> tuple[int, int]:
        """(u, r) on ``cp`` ranks; ``ulysses`` is u for a kind that uses both groups."""
        if self.groups == ("ulysses",):
            return cp, 1
        if self.groups == ("ring",):
            return 1, cp
        if ulysses < 1 or cp % ulysses:
            raise ValueError(f"attention {self.name!r}: the Ulysses size {ulysses} does not divide cp={cp}")
        return ulysses, cp // ulysses


def diagonal_excess(shape: LocalShape, tokens: int, heads: int, diagonals: int = 1) -> tuple[float, float]:
    """(forward, backward) FLOPs of the masked halves of ``diagonals`` square diagonal tiles of ``tokens``
    over ``heads`` heads, which the simulator's kernels compute whole (4·n²·d per head, half of it
    masked) and a causal flash kernel skips; backward recomputes S and runs 5 tile matmuls (2.5×)."""
    forward = diagonals * 2.0 * tokens * tokens * shape.head_dim * heads * shape.batch
    return forward, 2.5 * forward


def no_extra_memory(shape: LocalShape, u: int, r: int) -> int:
    return 0


def ring_problem(shape: LocalShape, layout: str, tokens: int | None = None) -> str | None:
    """A zigzag shard is two chunks, on any number of ranks (one included): it needs an even number of tokens."""
    tokens = shape.tokens if tokens is None else tokens
    if layout == "zigzag" and tokens % 2:
        return f"the zigzag layout needs an even number of tokens per rank, got {tokens}"
    return None


def heads_problem(shape: LocalShape, u: int) -> str | None:
    """An all-to-all over heads needs q and k/v heads divisible by the group."""
    if shape.q_heads % u or shape.kv_heads % u:
        return (f"the Ulysses all-to-all needs heads divisible by u={u}; got {shape.q_heads} query and "
                f"{shape.kv_heads} key/value heads per rank")
    return None
