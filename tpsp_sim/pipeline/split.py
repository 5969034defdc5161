"""Layers into stages: which layers each stage gets, and a stage's module cut from a model.

``layer_ranges(8, 4)`` → [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]; an uneven split is
given explicitly, ``layer_ranges(7, 3, sizes=(3, 2, 2))``.

``stage_module(blocks, stage_index, num_stages, first=embed, last=nn.Sequential(norm, head))`` is an
``nn.Sequential`` of the stage's blocks, with ``first`` in front on stage 0 and ``last`` behind on
the last stage (the modules themselves, not copies: gradients land on the model's parameters).
"""

from __future__ import annotations

from typing import Sequence

from torch import nn


def layer_ranges(n_layers: int, num_stages: int, sizes: Sequence[int] | None = None) -> list[range]:
    """The layers of each stage, in order; ``sizes`` gives an uneven split."""
    if sizes is None:
        if num_stages < 1 or n_layers % num_stages:
            raise ValueError(f"layer_ranges: num_stages={num_stages} does not divide the {n_layers} layers; "
                             f"pass sizes=(...) for an uneven split")
        sizes = [n_layers // num_stages] * num_stages
    if len(sizes) != num_stages or sum(sizes) != n_layers or min(sizes) < 0:
        raise ValueError(f"layer_ranges: sizes={tuple(sizes)} must be {num_stages} non-negative numbers adding up to "
                         f"the {n_layers} layers")
    starts = [sum(sizes[:i]) for i in range(num_stages + 1)]
    return [range(a, b) for a, b in zip(starts, starts[1:])]


def stage_module(blocks: Sequence[nn.Module], stage_index: int, num_stages: int, *, first: nn.Module | None = None,
                 last: nn.Module | None = None, sizes: Sequence[int] | None = None) -> nn.Sequential:
    """Stage ``stage_index``'s blocks (``layer_ranges``), ``first`` in front on stage 0, ``last`` behind on the last."""
    if not 0 <= stage_index < num_stages:
        raise ValueError(f"stage_module: stage_index={stage_index} must be in [0, {num_stages})")
    mods = [blocks[i] for i in layer_ranges(len(blocks), num_stages, sizes)[stage_index]]
    if stage_index == 0 and first is not None:
        mods.insert(0, first)
    if stage_index == num_stages - 1 and last is not None:
        mods.append(last)
    return nn.Sequential(*mods)
