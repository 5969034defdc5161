"""tpsp_sim: tensor, sequence and context parallelism on simulated (or real) ranks, byte by byte.

The package is layered; data flows one way, per-rank code → Comm → backend → trace → analysis → viz:

    core/              the Comm interface, the op table, the trace, errors, meshes, differentiable collectives
    sim/  dist/        the backends: virtual ranks (threads in this process); real torch.distributed
    torch_api/         torch.distributed's own API on these ranks: dist.*, DTensor, FSDP2 inside ts.run
    models/            the dense references: GPT and Llama blocks, a tiny Llama, dense attention
    tensor_parallel/   Megatron's parallel linears and a block's tensor-parallel sublayers (TP, TP+SP)
    context_parallel/  attention tiles and the context-parallel attention kinds (ring, Ulysses, USP, all-gather)
    hybrid/            the compositions: the parallel block (TP+SP × CP), the tiny Llama on a mesh, data parallelism
    pipeline/          pipeline stages and schedules (GPipe, 1F1B, interleaved, ZB-H1)
    data_parallel/     DDP's buckets, ZeRO-1/2, FSDP2's fully_shard
    analysis/          cost model and clusters, timeline, memory, sweeps, the planner
    viz/  exercises/   plots and the dashboard; the notebooks' exercises

Every public name is here, grouped as below (tests/test_public_api.py checks the README and the
notebooks use no other).
"""

import importlib.metadata as _metadata

# ---- running per-rank code, and what it records -------------------------------------------------
from .launch import run
from .core.comm import Comm, Work
from .core.result import RunResult
from .core.errors import CollectiveMismatchError, DeadlockError, RankFailedError, SimulationError
from .sim.runtime import SimComm
from .dist.torch_comm import TorchComm
from .core.trace import CommEvent, CommTrace, ComputeSpan, WaitMark, format_bytes
from .core.ops import wire_bytes
from .core.mesh import DeviceMesh, init_device_mesh
from .core.autograd import CommFunction
from .core import mappings
# torch.distributed on the simulator (ts.run(..., torch_distributed=True)): the process group over a rank's Comm,
# and fn wrapped for torchrun; PyTorch's TP+SP plan of LlamaBlock is tpsp_sim.torch_api.plans (imports DTensor: ~2 s)
from .torch_api.backend import on_default_group
from .torch_api.process_group import CommProcessGroup

# ---- dense references ---------------------------------------------------------------------------
from .models.attention import dense_attention
from .models.dropout import Dropout, DropoutRNG
from .models.gpt import MLP, SelfAttention, TransformerBlock
from .models.llama import LlamaBlock, RMSNorm, rope
from .models.tiny_llama import TinyLlama

# ---- tensor and sequence parallelism ------------------------------------------------------------
from .tensor_parallel.dense import gather_dense_grads, gather_dense_parameters
from .tensor_parallel.grad_sync import sync_sequence_parallel_grads
from .tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from .tensor_parallel.sharding import replicate

# ---- context parallelism ------------------------------------------------------------------------
from .context_parallel.attention import (attention_block, blockwise_attention, online_softmax_merge,
                                         sequence_positions, shard_sequence, unshard_sequence)
from .context_parallel.allgather import allgather_attention
from .context_parallel.ring import ring_attention
from .context_parallel.ulysses import ulysses_attention
from .context_parallel.usp import usp_attention, usp_shard_sequence, usp_unshard_sequence

# ---- compositions -------------------------------------------------------------------------------
from .hybrid.block import ParallelTransformerBlock
from .hybrid.context import hybrid_positions, shard_hybrid
from .hybrid.data_parallel import sync_gradients
from .hybrid.tiny_llama import ParallelTinyLlama
from . import pipeline  # stages and schedules in torch.distributed.pipelining's names
from .pipeline import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B, ScheduleZBH1
# data parallelism as it is run: DDP's buckets, ZeRO-1/2, FSDP2's fully_shard, and their closed forms
from .data_parallel.closed_forms import zero_bytes_per_step, zero_memory_per_rank
from .data_parallel.ddp import DistributedDataParallel
from .data_parallel.fsdp import FSDPModule, fully_shard
from .data_parallel.memory import held_bytes
from .data_parallel.overlap import StreamCall, fsdp_prefetch_overlap, grad_sync_overlap
from .data_parallel.zero import ZeroOptimizer

# ---- analysis -----------------------------------------------------------------------------------
from .analysis import cost, memory
from .analysis.cost import Hardware
from .analysis.memory import activation_memory
from .core.saved import saved_tensor_meter
from .analysis.models import Model
from .analysis.planner import Plan, plan
from .analysis.replay import Timeline, timeline

# ---- learning -----------------------------------------------------------------------------------
from . import exercises

try:
    __version__ = _metadata.version("tpsp_sim")  # one source: pyproject.toml
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    # running per-rank code, and what it records
    "run", "Comm", "Work", "RunResult", "SimulationError", "CollectiveMismatchError", "DeadlockError",
    "RankFailedError", "SimComm", "TorchComm", "CommEvent", "CommTrace", "ComputeSpan", "WaitMark", "format_bytes",
    "wire_bytes", "DeviceMesh", "init_device_mesh", "CommFunction", "mappings", "on_default_group", "CommProcessGroup",
    # dense references
    "dense_attention", "Dropout", "DropoutRNG", "MLP", "SelfAttention", "TransformerBlock", "LlamaBlock", "RMSNorm",
    "rope", "TinyLlama",
    # tensor and sequence parallelism
    "ColumnParallelLinear", "RowParallelLinear", "gather_dense_grads", "gather_dense_parameters", "replicate",
    "sync_sequence_parallel_grads",
    # context parallelism
    "attention_block", "blockwise_attention", "online_softmax_merge", "sequence_positions",
    "shard_sequence", "unshard_sequence", "allgather_attention", "ring_attention", "ulysses_attention",
    "usp_attention", "usp_shard_sequence", "usp_unshard_sequence",
    # compositions
    "ParallelTransformerBlock", "hybrid_positions", "shard_hybrid", "sync_gradients", "ParallelTinyLlama",
    "pipeline", "PipelineStage", "Schedule1F1B", "ScheduleGPipe", "ScheduleInterleaved1F1B", "ScheduleZBH1",
    "zero_bytes_per_step", "zero_memory_per_rank", "DistributedDataParallel", "FSDPModule", "fully_shard",
    "held_bytes", "StreamCall", "fsdp_prefetch_overlap", "grad_sync_overlap", "ZeroOptimizer",
    # analysis
    "cost", "memory", "Hardware", "activation_memory", "saved_tensor_meter", "Model", "Plan", "plan", "Timeline",
    "timeline",
    # learning
    "exercises",
]
