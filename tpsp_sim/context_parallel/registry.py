"""The context-parallel attention kinds, by name: the one list the hybrid block, the planner, the memory
budget, the sweep and the plots read. Adding a kind is one module that declares an ``AttentionKind``
(``kind.py``) plus one line here; ``register`` adds one at run time (your own, or a test's toy)."""

from __future__ import annotations

from . import allgather, ring, ulysses, usp
from .kind import AttentionKind

ATTENTIONS: dict[str, AttentionKind] = {k.name: k for k in (
    ring.KIND,
    ulysses.KIND,
    usp.KIND,
    allgather.KIND,
)}


def attention_kind(name: str) -> AttentionKind:
    """The kind called ``name``; a ValueError listing the kinds otherwise."""
    try:
        return ATTENTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"attention must be one of {tuple(ATTENTIONS)}, got {name!r}") from None


def register(kind: AttentionKind) -> AttentionKind:
    """Make ``kind`` known to everything that reads the registry; returns it. Names are unique."""
    if kind.name in ATTENTIONS:
        raise ValueError(f"an attention kind named {kind.name!r} is already registered")
    ATTENTIONS[kind.name] = kind
    return kind
