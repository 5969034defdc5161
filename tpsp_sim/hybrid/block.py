"""``ParallelTransformerBlock``: a dense block on tensor-parallel ranks (TP or TP+SP), and with ``cp``
its attention context-parallel too — the composition of ``tensor_parallel/`` and ``context_parallel/``.

What each mode moves is in ``tensor_parallel/blocks.py``; what the context-parallel attention adds, in
``context.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.comm import Comm
from ..models.dropout import Dropout, DropoutRNG
from ..models.gpt import TransformerBlock
from ..models.llama import LlamaBlock
from ..tensor_parallel.blocks import MODES, tensor_parallel_sublayers
from ..tensor_parallel.sharding import SEQUENCE_DIM, replicate
from .context import context_parallel_attention


class ParallelTransformerBlock(nn.Module):
    """One rank's part of a ``TransformerBlock`` or ``LlamaBlock`` (build with ``from_dense``); see the module docstring.

    Parameter names are the dense block's, so ``ts.gather_dense_grads(block)`` compares directly
    with ``dense.named_parameters()``. Under ``"tp_sp"`` call ``ts.sync_sequence_parallel_grads(block,
    comm)`` after backward (LayerNorm weights and row biases see only this rank's tokens).
    """

    def __init__(self, comm: Comm, mode: str, rng: DropoutRNG, ln1: nn.Module, attn: nn.Module, drop1: Dropout,
                 ln2: nn.Module, mlp: nn.Module, drop2: Dropout) -> None:
        super().__init__()
        self.comm, self.mode, self.rng = comm, mode, rng
        self.ln1, self.attn, self.drop1, self.ln2, self.mlp, self.drop2 = ln1, attn, drop1, ln2, mlp, drop2

    @classmethod
    def from_dense(cls, block: TransformerBlock | LlamaBlock, comm: Comm | None = None, mode: str | None = None, *,
                   tp: Comm | None = None, cp: Comm | tuple[Comm, Comm] | None = None, attention: str = "ring",
                   layout: str = "zigzag", seed: int = 0, exact_dropout: bool = False) -> "ParallelTransformerBlock":
        """Slice ``block`` for this rank. Dropout: masks of sharded tensors from this rank's own stream
        (seed, rank); with ``exact_dropout`` the dense block's masks for ``block.manual_seed(seed)``.

        ``tp`` is another name for ``comm``. With ``cp`` the attention runs context-parallel over it
        (``attention``: a kind of ``ts.context_parallel.registry``, "usp" with ``cp=(ulysses, ring)``;
        context.py).

        ``mode`` is required for the tensor-parallel block alone (``"tp"`` and ``"tp_sp"`` are the two
        lessons, neither a silent default); with ``cp`` it defaults to ``"tp_sp"`` (Megatron-LM's
        context parallelism runs with sequence parallelism)."""
        comm = _tensor_comm(comm, tp)
        if mode is None and cp is not None:
            mode = "tp_sp"
        if mode not in MODES:
            raise ValueError(f"rank {comm.rank}: ParallelTransformerBlock.from_dense: mode must be one of {MODES}"
                             f"{'' if cp is not None else ' (required without cp)'}, got {mode!r}")
        sp = mode == "tp_sp"
        rng = DropoutRNG(seed, comm, exact_dropout)
        seq = SEQUENCE_DIM if sp else None  # residual-stream tensors: sequence shards under SP, whole under TP
        attn, mlp, drops = tensor_parallel_sublayers(block, comm, sp, rng)
        if cp is not None:
            attn = context_parallel_attention(attn, cp, attention, layout, dropouts=drops, tp=comm, sequence_parallel=sp)
        parallel = cls(comm, mode, rng, replicate(block.ln1, sequence_parallel=sp), attn, Dropout(drops[0], rng, seq),
                       replicate(block.ln2, sequence_parallel=sp), mlp, Dropout(drops[1], rng, seq))
        return parallel.train(block.training)

    def manual_seed(self, seed: int) -> "ParallelTransformerBlock":
        """Restart both dropout streams from ``seed`` (the shared one, and this rank's own)."""
        self.rng.manual_seed(seed)
        return self

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``positions`` (Llama blocks only): global positions of the tokens the attention sees."""
        with self.comm.scope("attn"):
            h = self.ln1(x)
            x = x + self.drop1(self.attn(h) if positions is None else self.attn(h, positions))
        with self.comm.scope("mlp"):
            return x + self.drop2(self.mlp(self.ln2(x)))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, world_size={self.comm.world_size}"


def _tensor_comm(comm: Comm | None, tp: Comm | None) -> Comm:
    if (comm is None) == (tp is None):
        raise ValueError("ParallelTransformerBlock.from_dense needs the tensor-parallel comm once: as comm or as tp=")
    return comm if tp is None else tp
