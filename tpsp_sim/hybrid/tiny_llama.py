"""The tiny Llama (models/tiny_llama.py) on a (dp, cp, tp) mesh: what the hybrid block trains in.

``ParallelTinyLlama.from_dense(model, tp=..., cp=..., attention=..., layout=...)``): each rank
gets the tokens ``ts.shard_hybrid`` gives it (its cp piece, then its tp chunk: the residual stream of
TP+SP); the blocks are hybrid blocks (block.py); the embedding, the final norm and the head are
replicated and, seeing only this rank's tokens, marked ``sequence_parallel`` — their gradients are
summed over tp by ``ts.sync_gradients``, which then averages everything over the dp × cp replicas.
So that this average is the dense mean, each rank's loss is the sum over its tokens divided by the
tokens of its replica (its tp group): the tp ranks' losses add up to their replica's mean.

Replicated, not vocabulary-parallel: this teaching model keeps the whole embedding and head (V·h each)
on every tp rank, while ``ts.memory``'s parameter count (``analysis/models.py``,
``Model.other_parameters``) splits them over the vocabulary, V·h/t per rank, as Megatron-LM does. At
a tiny vocabulary the difference is small; at Llama 3's 128,256 tokens it is what makes the two differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.comm import Comm
from ..models.tiny_llama import TinyLlama
from ..tensor_parallel.sharding import replicate
from .block import ParallelTransformerBlock
from .context import ContextGroup


class ParallelTinyLlama(nn.Module):
    """One rank's part of a ``TinyLlama`` on a tp × cp grid (build with ``from_dense``); parameter names are the dense ones."""

    def __init__(self, embed: nn.Module, blocks: nn.ModuleList, norm: nn.Module, head: nn.Module, tp: Comm) -> None:
        super().__init__()
        self.embed, self.blocks, self.norm, self.head, self.tp = embed, blocks, norm, head, tp

    @classmethod
    def from_dense(cls, model: TinyLlama, *, tp: Comm, cp: ContextGroup, attention: str = "ring",
                   layout: str = "zigzag") -> "ParallelTinyLlama":
        blocks = nn.ModuleList(ParallelTransformerBlock.from_dense(b, tp=tp, cp=cp, mode="tp_sp", attention=attention,
                                                                   layout=layout) for b in model.blocks)
        sp = lambda m: replicate(m, sequence_parallel=True)
        return cls(sp(model.embed), blocks, sp(model.norm), sp(model.head), tp)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of this rank's tokens (``ts.shard_hybrid`` of the full batch)."""
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            with self.tp.scope(f"block{i}"):
                x = block(x)
        return self.head(self.norm(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross entropy summed over this rank's tokens, divided by its replica's (tp group's) token count."""
        logits = self(tokens)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / (
            targets.numel() * self.tp.world_size)
