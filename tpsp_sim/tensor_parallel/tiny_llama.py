"""A tiny Llama-style language model, dense and on a (dp, cp, tp) mesh: what the hybrid block trains in.

Dense: token embedding → ``n_layers`` ``LlamaBlock``s → RMSNorm → LM head; next-token cross entropy,
the mean over every token of the batch.

Parallel (``ParallelTinyLlama.from_dense(model, tp=..., cp=..., attention=..., layout=...)``): each rank
gets the tokens ``ts.shard_hybrid`` gives it (its cp piece, then its tp chunk: the residual stream of
TP+SP); the blocks are hybrid blocks (hybrid.py); the embedding, the final norm and the head are
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
from .blocks import ParallelTransformerBlock
from .hybrid import ContextGroup
from .layers import replicate
from .llama import LlamaBlock, RMSNorm


class TinyLlama(nn.Module):
    """Dense reference: ``model(tokens)`` → logits ``[batch, seq, vocab]``."""

    def __init__(self, vocab: int, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int | None = None,
                 d_ff: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(LlamaBlock(d_model, n_heads, n_kv_heads, d_ff) for _ in range(n_layers))
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy over every token."""
        return F.cross_entropy(self(tokens).flatten(0, 1), targets.flatten())


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
