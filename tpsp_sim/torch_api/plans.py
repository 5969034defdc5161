"""PyTorch's own tensor + sequence parallel plan for ``ts.LlamaBlock`` (torchtitan's, for its Llama blocks).

``parallelize_module(block, mesh["tp"], llama_tp_sp_plan())`` turns a dense ``LlamaBlock`` into the
Megatron TP+SP block written with DTensor: the residual stream is sharded over the sequence (dim 1),
the RMSNorms run on the shards (``SequenceParallel``), ``PrepareModuleInput`` all-gathers the
sequence before attention and the MLP (g), q/k/v and gate/up are split by output features
(``ColwiseParallel``: heads, and SwiGLU features), o and down by input features with a
reduce-scatter back to sequence shards (``RowwiseParallel(output_layouts=Shard(1))``: ḡ). Call it
on the block's sequence shard, ``x.chunk(t, 1)[rank]``; positions default to 0 .. s-1, right because
attention sees the gathered sequence. Needs n_kv_heads divisible by t.

Against the package's ``ParallelTransformerBlock(mode="tp_sp")`` (hybrid/block.py), per
block and rank, E = b·s·h elements: the same forward (2 all-gathers + 2 reduce-scatters of E) and
2 fewer all-gathers in backward — autograd keeps the gathered input of q/k/v and gate/up for their
weight gradients, where Megatron keeps the shard and gathers it again (E·(t−1)/t·e bytes each; it
saves (t−1)/t of that activation's memory). The RMSNorm weight gradients are left ``Partial`` (one
rank's tokens each) until they are used — ``full_tensor()`` or the optimizer all-reduces each one —
where the package sums both in one all-reduce (``sync_sequence_parallel_grads``).
"""

from __future__ import annotations

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput,
                                               RowwiseParallel, SequenceParallel)


def llama_tp_sp_plan() -> dict[str, ParallelStyle]:
    """The DTensor plan of a ``LlamaBlock`` (module names → parallel styles), sequence dim 1."""
    return {
        "ln1": SequenceParallel(),
        "attn": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
        "attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
        "attn.o": RowwiseParallel(output_layouts=Shard(1)),
        "ln2": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "mlp.gate": ColwiseParallel(), "mlp.up": ColwiseParallel(),
        "mlp.down": RowwiseParallel(output_layouts=Shard(1)),
    }
