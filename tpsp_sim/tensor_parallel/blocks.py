"""A dense block's sublayers on t tensor-parallel ranks: what ``ParallelTransformerBlock`` is built of.

``ParallelTransformerBlock.from_dense(block, comm, mode)`` (``hybrid/block.py``) runs the dense
block's computation (``models/``: the GPT ``TransformerBlock``, the ``LlamaBlock``) on t ranks with
the same parameter names, each parameter an exact slice of the dense one:

* ``"tp"`` (Shoeybi et al. 2019): x is whole on every rank. attn.qkv and mlp.fc1 are column
  layers (f before), attn.proj and mlp.fc2 row layers (f̄ after): each rank runs its n_heads/t
  heads and d_ff/t MLP features. Forward: 2 all-reduces per block; backward: 2 (the f's).
* ``"tp_sp"`` (Korthikanti et al. 2022): x is this rank's contiguous chunk of the sequence (dim 1).
  LayerNorms, dropouts and residuals run on the chunk; g (all-gather) replaces f and ḡ
  (reduce-scatter) replaces f̄. Forward: 2 all-gathers + 2 reduce-scatters, the same bytes as 2
  all-reduces; backward: the mirror image plus the 2 all-gathers that rebuild the saved input shards.

``from_dense`` also takes a ``LlamaBlock``: q, k, v become one fused, head-aware column
layer ``attn.qkv`` and gate, up one ``mlp.gate_up``, so the collectives are the GPT block's. Per
rank, with E = b·s·h elements of the block's input (whole sequence) of e bytes each:

    "tp"     forward 2 all-reduces of E: 4(t-1)/t·E·e;  backward the same (the two f's)
    "tp_sp"  forward 2 all-gathers + 2 reduce-scatters: 4(t-1)/t·E·e;
             backward 2 reduce-scatters + 4 all-gathers:  6(t-1)/t·E·e

plus, in backward, when n_kv_heads < t, one all-reduce of the replicated K/V rows' weight gradient
over the g = t/n_kv_heads ranks sharing a K/V head: 2(g-1)/g · 2·h·d_head·e (layers.py). One column
layer per projection instead (q, k, v, gate, up) would add 3 f's in "tp" backward (5 all-reduces
instead of 2), and in "tp_sp" 3 all-gathers in forward and 3 reduce-scatters + 3 all-gathers in
backward. ``positions`` (``forward(x, positions)``): the global positions of the tokens the
attention sees — the whole sequence under "tp" and "tp_sp" (the column layer gathers it), so the
default 0 .. s-1 is right for both.
"""

from __future__ import annotations

from torch import nn

from ..core.comm import Comm
from ..models.dropout import Dropout, DropoutRNG
from ..models.gpt import MLP, SelfAttention, TransformerBlock
from ..models.llama import FusedQKVAttention, FusedSwiGLU, LlamaBlock
from .layers import ColumnParallelLinear, RowParallelLinear

MODES = ("tp", "tp_sp")


def tensor_parallel_sublayers(block: TransformerBlock | LlamaBlock, comm: Comm, sequence_parallel: bool,
                              rng: DropoutRNG) -> tuple[nn.Module, nn.Module, tuple[float, float]]:
    """(attn, mlp, residual dropout probabilities) of ``block`` on this rank of ``comm``."""
    if isinstance(block, LlamaBlock):
        return (*_llama_sublayers(block, comm, sequence_parallel), (0.0, 0.0))  # Llama has no dropout
    return (*_gpt_sublayers(block, comm, sequence_parallel, rng), (block.drop1.p, block.drop2.p))


def _check_divisible(comm: Comm, sizes: tuple[tuple[str, int], ...]) -> None:
    for name, size in sizes:
        if size % comm.world_size:
            raise ValueError(f"rank {comm.rank}: {name}={size} is not divisible by the tensor-parallel size "
                             f"t={comm.world_size}")


def _gpt_sublayers(block: TransformerBlock, comm: Comm, sp: bool, rng: DropoutRNG) -> tuple[nn.Module, nn.Module]:
    """attn: qkv column (stride 3: q, k, v of my heads) + proj row; mlp: fc1 column + fc2 row."""
    _check_divisible(comm, (("n_heads", block.n_heads), ("d_ff", block.d_ff)))
    attn = SelfAttention(
        ColumnParallelLinear.from_dense(block.attn.qkv, comm, sequence_parallel=sp, stride=3),
        RowParallelLinear.from_dense(block.attn.proj, comm, sequence_parallel=sp),
        block.attn.head_dim, block.causal, Dropout(block.attn.attn_drop.p, rng, shard_dim=1))  # heads are split
    mlp = MLP(ColumnParallelLinear.from_dense(block.mlp.fc1, comm, sequence_parallel=sp),
              RowParallelLinear.from_dense(block.mlp.fc2, comm, sequence_parallel=sp))
    return attn, mlp


def _llama_sublayers(block: LlamaBlock, comm: Comm, sp: bool) -> tuple[nn.Module, nn.Module]:
    """attn: fused head-aware [q | k | v] column (K/V heads replicated when n_kv_heads < t) + o row;
    mlp: fused [gate | up] column + down row."""
    t, a = comm.world_size, block.attn
    _check_divisible(comm, (("n_heads", a.n_heads), ("d_ff", block.d_ff)))
    if a.n_kv_heads % t and t % a.n_kv_heads:
        raise ValueError(f"rank {comm.rank}: attn.qkv: n_kv_heads={a.n_kv_heads} K/V heads can be neither split "
                         f"over nor replicated on t={t} ranks (one must divide the other)")
    qkv = ColumnParallelLinear.from_dense([a.q, a.k, a.v], comm, sequence_parallel=sp,
                                          heads=(a.n_heads, a.n_kv_heads, a.n_kv_heads), names=("q", "k", "v"))
    attn = FusedQKVAttention(qkv, RowParallelLinear.from_dense(a.o, comm, sequence_parallel=sp),
                             a.n_heads // t, max(a.n_kv_heads // t, 1), a.head_dim, a.rope_theta, a.causal)
    gate_up = ColumnParallelLinear.from_dense([block.mlp.gate, block.mlp.up], comm, sequence_parallel=sp,
                                              names=("gate", "up"))
    return attn, FusedSwiGLU(gate_up, RowParallelLinear.from_dense(block.mlp.down, comm, sequence_parallel=sp))
