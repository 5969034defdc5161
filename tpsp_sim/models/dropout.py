"""Dropout whose masks come from explicit generators, so a sharded run can draw the dense run's masks.

Virtual ranks are threads, and torch's default generator is shared by all of them: ``DropoutRNG``
holds Megatron's two random streams as ``torch.Generator``s instead.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.comm import Comm


class DropoutRNG:
    """Where dropout masks come from: Megatron's two random streams as explicit generators.

    ``default`` is the same stream on every rank (seeded with ``seed``): masks of tensors every rank
    holds whole. ``model_parallel`` is this rank's own stream (seeded with seed + 2718 + rank, as
    Megatron does): masks of sharded tensors (heads under TP, sequence shards under SP), so no two
    shards repeat one pattern. With ``exact``, every rank draws the FULL mask from ``default`` and
    keeps its slice, so the masks are a dense run's with the same seed (t times the random numbers:
    for checks). With no comm and no seed, ``default`` is torch's global generator (a plain model).
    """

    def __init__(self, seed: int | None = None, comm: Comm | None = None, exact: bool = False) -> None:
        self.comm, self.exact = comm, exact
        self.manual_seed(seed)

    def manual_seed(self, seed: int | None) -> None:
        if self.comm is not None and seed is None:
            raise ValueError(f"rank {self.comm.rank}: a DropoutRNG on ranks needs a seed "
                             "(torch's global generator is shared by every virtual rank)")
        self.default = None if seed is None else torch.Generator().manual_seed(seed)
        self.model_parallel = None if self.comm is None else torch.Generator().manual_seed(seed + 2718 + self.comm.rank)

    def keep_mask(self, x: torch.Tensor, p: float, shard_dim: int | None) -> torch.Tensor:
        """A bool mask (1 byte per element) of ``x``, which is this rank's chunk of ``shard_dim`` (None: whole)."""
        if self.comm is None or shard_dim is None:
            return _bernoulli(x.shape, p, self.default)
        if not self.exact:
            return _bernoulli(x.shape, p, self.model_parallel)
        full = list(x.shape)
        full[shard_dim] *= self.comm.world_size
        return _bernoulli(full, p, self.default).chunk(self.comm.world_size, shard_dim)[self.comm.rank].clone()


def _bernoulli(shape, p: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator) >= p


class Dropout(nn.Module):
    """forward: x · mask / (1 - p), backward: grad · mask / (1 - p); the mask is drawn from ``rng``.

    ``shard_dim``: the dim this rank holds a chunk of (None: the whole tensor). Saves only the
    1-byte mask for backward.
    """

    def __init__(self, p: float, rng: DropoutRNG, shard_dim: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.rng, self.shard_dim = p, rng, shard_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * self.rng.keep_mask(x, self.p, self.shard_dim).to(x.device) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, shard_dim={self.shard_dim}"
