"""tpsp_sim: tensor, sequence and context parallelism on simulated (or real) ranks, byte by byte."""

from . import cost, mappings
from .attention import (attention_block, blockwise_attention, dense_attention, online_softmax_merge,
                        shard_sequence, unshard_sequence)
from .blocks import MLP, ParallelTransformerBlock, SelfAttention, TransformerBlock
from .comm import Comm, Work
from .cost import Hardware
from .errors import CollectiveMismatchError, DeadlockError, RankFailedError, SimulationError
from .launch import run
from .layers import (ColumnParallelLinear, Dropout, DropoutRNG, RowParallelLinear, gather_dense_grads,
                     gather_dense_parameters, replicate, sync_sequence_parallel_grads)
from .memory import activation_memory, saved_tensor_meter
from .ring import ring_attention
from .runtime import RunResult, SimComm
from .timeline import Timeline
from .trace import CommEvent, CommTrace, ComputeSpan, WaitMark, format_bytes, wire_bytes
from .ulysses import ulysses_attention

__version__ = "0.1.0"

__all__ = [
    "CollectiveMismatchError", "Comm", "CommEvent", "CommTrace", "ComputeSpan", "DeadlockError",
    "RankFailedError", "RunResult", "SimComm", "SimulationError", "WaitMark", "Work", "format_bytes",
    "mappings", "run", "wire_bytes",
    "attention_block", "blockwise_attention", "dense_attention", "online_softmax_merge", "ring_attention",
    "shard_sequence", "ulysses_attention", "unshard_sequence",
    "ColumnParallelLinear", "Dropout", "DropoutRNG", "MLP", "ParallelTransformerBlock", "RowParallelLinear",
    "SelfAttention", "TransformerBlock", "activation_memory", "gather_dense_grads", "gather_dense_parameters",
    "replicate", "saved_tensor_meter", "sync_sequence_parallel_grads",
    "Hardware", "Timeline", "cost",
]
