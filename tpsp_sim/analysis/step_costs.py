"""What a step costs beyond its layers (``ts.plan``'s steps 3 and 4): the pipeline's transfers and bubble, the
gradient synchronisation over dp·cp, and ZeRO 3's per-layer weight gathers, each priced with ``ts.cost`` on the link
its group uses."""

from __future__ import annotations

from ..pipeline.registry import bubble_fraction
from .cluster import Link
from .cost import collective_time
from .models import Model


def priced_schedule(v: int) -> str:
    """The pipeline schedule the planner prices for ``v`` model chunks per rank: 1F1B, interleaved 1F1B when v > 1."""
    return "1f1b" if v == 1 else "interleaved_1f1b"


def bubble_share(pp: int, m: int, v: int) -> float:
    """The bubble's seconds per second of busy time: f/(1 − f) with f = ``ts.pipeline.bubble_fraction`` of 1F1B
    ((p−1)/(m+p−1)) or interleaved 1F1B ((p−1)/(v·m+p−1)), so that busy + bubble = busy · (m + (p−1)/v) / m."""
    if pp == 1:
        return 0.0
    f = bubble_fraction(priced_schedule(v), pp, m, v)
    return f / (1 - f)


def gradient_sync_time(parameters: float, zero: int, grad_bytes: int, replicas: int, link: Link,
                       microbatches: int = 1) -> float:
    """Seconds of the gradient synchronisation of the ``parameters`` a GPU holds over the dp·cp ``replicas``
    in one step (not overlapped with backward).

    ZeRO 0: an all_reduce of the gradients (``grad_bytes`` each; Megatron reduces its fp32 main gradients
    in fp32), as a ring or NCCL's tree, whichever ``ts.cost`` finds faster. ZeRO 1 (Megatron's distributed optimizer): a reduce_scatter of the gradients, then an
    all_gather of the updated bf16 weights (each replica's 1/replicas shard), once per step. ZeRO 2 and 3 keep
    only a gradient shard, so they reduce-scatter after every one of the ``microbatches`` (DeepSpeed's
    gradient partitioning; FSDP without ``no_sync``), then all-gather once. Bytes per rank with one micro-batch:
    2Ψ(p−1)/p (``zero_bytes_per_step``); ZeRO 3's per-layer weight gathers are ``weight_gather_exposed``.
    """
    if zero == 0:
        return collective_time("all_reduce", int(grad_bytes * parameters), replicas, link)
    return ((microbatches if zero >= 2 else 1) * collective_time("reduce_scatter", int(grad_bytes * parameters),
                                                                 replicas, link)
            + collective_time("all_gather", int(2 * parameters) // replicas, replicas, link))


def weight_gather_exposed(layer_parameters: float, replicas: int, link: Link, forward: float, backward: float) -> float:
    """Seconds per layer and micro-batch that ZeRO 3 (FSDP, ``reshard_after_forward=True``) waits for its weights:
    the layer's bf16 weights are all-gathered over the dp·cp ``replicas`` before its forward and again before its
    backward, g = ``collective_time("all_gather", 2·Ψ_layer/p)`` each (every rank sends Ψ_layer(p−1)/p bytes: with the
    step's reduce-scatter, 3Ψ(p−1)/p per step, ``zero_bytes_per_step(Ψ, p, 3)``). FSDP prefetches the next
    layer's gather during this layer's compute, so only what the compute does not cover waits:

        max(0, g − forward) + max(0, g − backward)
    """
    gather = collective_time("all_gather", int(2 * layer_parameters) // replicas, replicas, link)
    return max(0.0, gather - forward) + max(0.0, gather - backward)


def pipeline_transfer_time(m: Model, seq: int, micro_batch: int, cp: int, tp: int, link: Link) -> float:
    """Seconds of one stage boundary's send of one micro-batch: the activation forward (or its gradient backward),
    each rank's sequence-parallel shard, s/(cp·tp) · b · h bf16 values (``ts.pipeline.sent_bytes``' activation),
    between pipeline neighbours r and r + dp·cp·tp on ``link``. Not overlapped with compute (an upper bound:
    Megatron overlaps part of it)."""
    return collective_time("send", 2 * seq // (cp * tp) * micro_batch * m.d_model, 2, link)
