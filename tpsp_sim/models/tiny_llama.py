"""A tiny Llama-style language model, the dense reference that ``ParallelTinyLlama`` (hybrid/) trains against.

Token embedding → ``n_layers`` ``LlamaBlock``s → RMSNorm → LM head; next-token cross entropy, the
mean over every token of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
