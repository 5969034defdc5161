"""The one lookup of the analysis presets (``MODELS``, ``PRESETS``, ``CLUSTERS``) by key."""

from __future__ import annotations

from typing import Mapping, TypeVar

T = TypeVar("T")


def preset(table: Mapping[str, T], key: str, kind: str) -> T:
    """``table[key]``, or a ValueError naming the ``kind`` of preset and the keys there are."""
    if key not in table:
        raise ValueError(f"unknown {kind} {key!r}; presets are {sorted(table)}")
    return table[key]
