"""``ts.plan``: how to split a long-context training run over PP × DP × CP × TP on a cluster, and will it fit.

For every factorisation gpus = pp · dp · cp · tp (tp innermost, then cp, then dp, pp slowest: Megatron's order,
so a tp group is tp neighbouring ranks and pipeline neighbours are dp·cp·tp ranks apart), every number of
virtual stages (model chunks per pipeline rank: interleaved 1F1B when v > 1), every context-parallel attention
(ring, Ulysses, USP with each Ulysses size u, 1 < u < cp), every recompute mode and every ZeRO stage asked for:

1. memory per GPU: ``ts.memory.budget`` with the same defaults (Megatron's accounting: bf16 weights,
   fp32 master weights and main gradients, Adam with the distributed optimizer over dp·cp (``zero=1``),
   Table 2 activations, the output layer's logits, a 2 GiB reserve; under pipeline parallelism the worst
   rank: its layers, the embedding or output layer, the micro-batches its schedule keeps in flight); a plan
   that does not fit in ``Cluster.memory_bytes`` is listed with why, and not simulated;
2. one layer, forward and backward, simulated on meta tensors on a (cp, tp) mesh of virtual ranks
   (``ts.analysis.layer``: the hybrid TP+SP × CP block, Llama-shaped for "swiglu" models; the few ranks
   its symmetry needs simulated, the few the cluster's nodes tell apart replayed), laid out
   on the cluster by ``ts.timeline`` with compute at ``mfu`` × peak (each call priced on its group's
   link). The busiest rank's compute, exposed communication per axis and idle time, times the
   layers of the busiest pipeline rank and the m micro-batches of a step (m = ``global_batch_tokens`` /
   (dp · micro_batch · seq)) is the pipeline rank's busy time; "full" recompute adds the layer's forward
   compute again; ZeRO 3 adds its per-layer weight gathers (``weight_gather_exposed``; this and the next two steps
   are priced in step_costs.py);
3. the pipeline (pp > 1): each micro-batch's activation and gradient cross every boundary
   (``pipeline_transfer_time`` on the pp axis's link, ``Cluster.link((r, r + dp·cp·tp))``), and the 1F1B
   bubble (``ts.pipeline.bubble_fraction``: (p−1)/(m+p−1), interleaved (p−1)/(v·m+p−1)) stretches the busy
   time t·m to t·(m + (p−1)/v);
4. plus the gradient synchronisation over dp·cp once per step (``gradient_sync_time``, not overlapped;
   ZeRO 2 and 3 reduce-scatter after every micro-batch) is the step time.

Causal attention: the simulator's kernels compute a masked (diagonal) tile whole, as a square, and
count its FLOPs so; a causal flash kernel skips the masked half. Left as is, cp = 1 (one s × s
diagonal) would be charged twice the attention FLOPs it needs, and context parallelism would look
better than it is. So the busiest rank's compute is reduced by half of its diagonal tiles
(``causal_overcount``), forward and backward. This corrects the compute only: a rank
whose timeline waited on a transfer under the masked half is not re-laid out.

What it ignores is listed, complete, in ``IGNORES``. Among it: one stated MFU (default 0.5)
for all compute; overlap of the gradient synchronisation with backward (Megatron's
``--overlap-grad-reduce`` hides most of it: the step times here are upper bounds on it). Attention
kernels are assumed flash-style (no s × s scores kept, tiles recomputed in backward, as
``ring_attention`` does), so "selective" (Table 2's row: keep everything but the scores) costs no
extra compute and "none" would be the same plan. When nothing fits, ``fewest_gpus`` says on how many
GPUs something would.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import get_context
from typing import Callable, Iterable, Iterator

from ..context_parallel.registry import ATTENTIONS, attention_kind
from ..core.table import Table
from .cluster import Cluster, cluster as as_cluster
from .cost import format_seconds
from .kernels import AttentionKernel, attention_shares
from .layer import LayerTime, causal_attention_flops, price_layer
from ..pipeline.interleaved import round_size
from .memory import DTYPE_BYTES, RESERVE_BYTES, ZERO_STAGES, Budget, budget, stage_layers
from .models import Model, model as as_model
from .step_costs import (bubble_share, gradient_sync_time, pipeline_transfer_time, priced_schedule,
                         weight_gather_exposed)

PLANNED_RECOMPUTE = ("selective", "full")  # memory.RECOMPUTE's "none" is "selective" under flash attention
EXPOSED = ("tp", "cp", "pp", "dp_cp")  # the columns of exposed communication: the layer's axes and the pipeline's
GIB = 2**30
IGNORES = ("the zero-bubble and GPipe schedules (1F1B and interleaved 1F1B are priced) and pipeline stages of unequal "
           "time (a pipeline is priced at its busiest rank's layers, with the bubble of uniform stages); the "
           "overlap of the pipeline's point-to-point transfers with compute (counted fully exposed) and the tied "
           "embedding's all-reduce between the first and last stage; the embedding "
           "and output layer's compute (their memory is counted); kernel efficiency beyond one MFU for all compute "
           "unless attention_efficiency is given (FlashAttention-3 runs causal attention at 0.62 of peak forward and "
           "0.57 backward, ts.analysis.kernels); FP8 GEMMs; overlap of the "
           "gradient synchronisation with backward (counted fully exposed; ZeRO 3's weight gathers are prefetched "
           "behind the previous layer's compute); "
           "the overlap of TP's forward all-gathers and reduce-scatters (Transformer Engine's chunked GEMMs; overlap_tp hides the backward's); the sequence-parallel "
           "norm-gradient all-reduce; NCCL's NVLS-tree and CollNet (SHARP) all_reduce across nodes (rings and trees "
           "are priced: ts.cost.all_reduce_algorithm), and its LL / LL128 protocols; network contention between groups; "
           "allocator fragmentation beyond the reserve. Attention kernels are assumed flash-style (no scores kept), "
           "so recompute 'selective' costs no extra compute.")


@dataclass(frozen=True)
class Plan:
    """One way to run the step: mesh, attention, recompute, pipeline and ZeRO stage; its predicted time (seconds)
    and memory (bytes per GPU, the worst pipeline rank)."""

    dp: int
    cp: int
    tp: int
    attention: str  # "ring", "ulysses", "usp(u=2)", or "-" when cp = 1
    recompute: str
    memory: Budget
    fits: bool
    why: str
    step_time: float | None = None  # None: not simulated (does not fit, or cannot run)
    compute: float = 0.0
    exposed: dict[str, float] = field(default_factory=dict)  # per axis: "tp", "cp", "pp", "dp_cp"
    idle: float = 0.0
    pp: int = 1
    v: int = 1  # virtual stages (model chunks) per pipeline rank: interleaved 1F1B when > 1
    microbatches: int = 0  # per step and dp replica: global batch / (dp · micro_batch)
    zero: int = 1
    bubble: float = 0.0  # seconds the busiest pipeline rank idles in the pipeline's fill and drain
    overlap_tp: bool = False  # TP's communication overlapped with its GEMMs (Megatron's --tp-comm-overlap)
    micro_batch: int = 1  # sequences per micro-batch and dp replica

    @property
    def runs(self) -> bool:
        return self.step_time is not None

    @property
    def schedule(self) -> str:
        """The pipeline schedule priced: "1f1b", "interleaved_1f1b" when v > 1, "-" without pipeline."""
        return "-" if self.pp == 1 else priced_schedule(self.v)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _attention_kinds(cp: int, attentions: Iterable[str]) -> list[tuple[str, str, int]]:
    """(label, kind, ulysses size) of each context-parallel attention to try on ``cp`` ranks: a kind with
    both groups once per Ulysses size u, 1 < u < cp."""
    if cp == 1:
        return [("-", "ring", 1)]
    kinds = []
    for kind in attentions:
        if len(attention_kind(kind).groups) == 2:
            kinds += [(f"{kind}(u={u})", kind, u) for u in _divisors(cp) if 1 < u < cp]
        else:
            kinds.append((kind, kind, 1))
    return kinds


def _pipelines(m: Model, pp: int, microbatches: int, virtual_stages: Iterable[int]) -> list[tuple[int, list[int] | str]]:
    """(v, the layers of each of the pp·v stages, or why none) for each virtual stage count to try: an even split,
    else Llama 3's (first and last stage one layer fewer, ``stage_layers(balance="ends")``). Interleaving
    (v > 1) only where the split and torch's rounds (``round_size``: m >= pp) allow; v = 1 always answers."""
    if pp == 1:
        return [(1, [m.n_layers])]
    found = []
    for v in sorted(set(virtual_stages) | {1}):
        split = next((layers for balance in ("even", "ends") for layers in [_split(m.n_layers, pp * v, balance)]
                      if layers), None)
        if v == 1:
            found.append((1, split or f"n_layers={m.n_layers} does not split into pp={pp} stages (evenly, or with "
                                      f"the first and last one layer fewer)"))
            continue
        try:
            round_size(pp, microbatches)
        except ValueError:
            continue
        if split:
            found.append((v, split))
    return found


def _split(n_layers: int, stages: int, balance: str) -> list[int] | None:
    try:
        return stage_layers(n_layers, stages, balance)
    except ValueError:
        return None


def plan(model: Model | str, seq: int, gpus: int, cluster: Cluster | str, *, micro_batch: int | Iterable[int] = 1,
         global_batch_tokens: int = 16 * 2**20, mfu: float = 0.5, attentions: Iterable[str] = tuple(ATTENTIONS),
         recompute: Iterable[str] = PLANNED_RECOMPUTE, zero: int | Iterable[int] = 1, grad_dtype: str = "fp32",
         reserve: float = RESERVE_BYTES, overlap_tp: bool | Iterable[bool] = False, max_tp: int | None = None,
         tp_within_node: bool = False, dp: int | None = None, cp: int | None = None, tp: int | None = None,
         pp: int | None = None, max_pp: int | None = None, virtual_stages: Iterable[int] = (1, 2),
         attention_efficiency: float | tuple[float, float] | AttentionKernel | str | None = None,
         progress: Callable[[Iterable], Iterable] = iter, workers: int | None = 1) -> list[Plan]:
    """Every (pp, dp, cp, tp) × virtual stages × attention × recompute × ZeRO plan for ``model`` at ``seq`` tokens
    on ``gpus`` GPUs of ``cluster``, best first: the plans that fit by step time, then the rest (module docstring).

    ``attention_efficiency``: the causal attention core's speed when it differs from ``mfu`` (GEMMs and the rest
    stay at ``mfu``): a share of peak, a (forward, backward) pair, or a published kernel (``ts.analysis.kernels``:
    an ``AttentionKernel`` or its key, e.g. "fa3-h100-bf16": FlashAttention-3's 616 / 561 TFLOP/s of 989).
    None (default): one ``mfu`` for all compute. The default stays one MFU on purpose: ``mfu`` is an end-to-end
    figure (whole steps measured at 0.4-0.5), while the kernels' numbers are one kernel alone on the GPU at
    16K tokens, an upper bound in a step whose communication kernels take SMs; and it keeps every published
    plan's number. Pass the cluster's kernel to price long-context steps at FlashAttention's speed.
    Search space: ``pp``, ``dp``, ``cp``, ``tp`` fix an axis; ``max_tp`` and ``max_pp`` cap tp and pp;
    ``tp_within_node`` keeps each tp group on one node; ``virtual_stages``: the model chunks per pipeline
    rank to try (v > 1: interleaved 1F1B); ``zero``: one ZeRO stage or several to try, e.g. ``(1, 2, 3)``.
    ``evaluate`` prices one split. A step trains ``global_batch_tokens`` tokens (default 16M, Llama 3's batch): global_batch_tokens /
    seq sequences, in micro-batches of ``micro_batch`` sequences per dp replica (m = sequences / (dp ·
    micro_batch) micro-batches go through each pipeline); ``micro_batch`` may be several sizes to try, e.g.
    ``(1, 2)`` (each is simulated: a layer's time is not linear in it). ``overlap_tp``: overlap TP's
    communication with its GEMMs as Megatron's ``--tp-comm-overlap`` does (``ts.timeline``); True, False or
    both to try, ``(False, True)``. Default False: Megatron's own default (the flag is opt-in, it needs
    Transformer Engine's userbuffers), and one simulation per split instead of two; each plan records it
    (``Plan.overlap_tp``). ``cluster``: a ``Cluster`` or a key of ``ts.cost.CLUSTERS``, as ``ts.timeline`` takes.

    ``grad_dtype`` and ``reserve`` are ``ts.memory.budget``'s (the same defaults). One layer is simulated per
    distinct (cp, tp, attention, micro_batch, overlap_tp), shared by every pp, dp, ZeRO stage and recompute mode
    (pp and dp add only closed forms); ``workers`` > 1 runs these simulations in that many processes (the plans
    are the same); None: one per CPU when at least ``PROCESSES_FROM`` simulations are to run, else none (a
    spawned process that imports torch costs more than a small search). ``progress`` wraps the simulations as
    they finish, a sized iterable (e.g. ``tqdm.tqdm``). Deterministic: the same arguments give the same plans.
    """
    m, c = as_model(model), as_cluster(cluster)
    sequences = global_batch_tokens // seq
    if sequences < 1:
        raise ValueError(f"global_batch_tokens={global_batch_tokens} is less than one sequence of {seq} tokens")
    attentions, modes = tuple(attentions), tuple(recompute)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive int or None (automatic), got {workers!r}")
    if attention_efficiency is not None:
        attention_shares(attention_efficiency)  # a clear error before anything is simulated
    overlaps = _choices("overlap_tp", overlap_tp, bool, lambda v: isinstance(v, bool))
    micro_batches = _choices("micro_batch", micro_batch, int,
                             lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1)
    zeros, stages = ((zero,) if isinstance(zero, int) else tuple(zero)), tuple(virtual_stages)
    unknown = [a for a in attentions if a not in ATTENTIONS] + [r for r in modes if r not in PLANNED_RECOMPUTE]
    if unknown:
        raise ValueError(f"unknown attention or recompute {unknown}; attentions are {tuple(ATTENTIONS)}, "
                         f"recompute {PLANNED_RECOMPUTE}")
    if not zeros or any(z not in ZERO_STAGES for z in zeros):
        raise ValueError(f"zero must be one of {ZERO_STAGES} or several of them, got {zero!r}")
    if not stages or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in stages):
        raise ValueError(f"virtual_stages must be positive ints, got {virtual_stages!r}")
    candidates: list[tuple] = []
    plans: list[Plan] = []
    fixed = {"pp": pp, "dp": dp, "cp": cp, "tp": tp}
    meshes = _meshes(gpus, c, fixed, max_tp, max_pp, tp_within_node)
    for micro_batch, (pp, tp, cp, dp) in ((b, mesh) for b in micro_batches for mesh in meshes):
        reason = _cannot_split(m, seq, sequences, micro_batch, dp, cp, tp)
        if reason:  # one row for the mesh, whatever the attention and recompute
            plans.append(Plan(dp, cp, tp, "-", "-", Budget(0, 0, 0, 0, 0, 0), False, reason, pp=pp,
                              micro_batch=micro_batch))
            continue
        count = sequences // (dp * micro_batch)
        for v, layers in _pipelines(m, pp, count, stages):
            if isinstance(layers, str):
                plans.append(Plan(dp, cp, tp, "-", "-", Budget(0, 0, 0, 0, 0, 0), False, layers, pp=pp,
                                  microbatches=count, micro_batch=micro_batch))
                continue
            pipeline = dict(pp=pp, virtual_stages=v, schedule=priced_schedule(v),
                            n_microbatches=count, layers_per_stage=None if pp == 1 else layers)
            for label, kind, u in _attention_kinds(cp, attentions):
                for mode in modes:
                    for z in zeros:
                        mem = budget(m, (dp, cp, tp), seq, micro_batch, recompute=mode, zero=z, grad_dtype=grad_dtype,
                                     reserve=reserve, attention=kind, ulysses=u, **pipeline)
                        shape = dict(pp=pp, v=v, microbatches=count, zero=z, micro_batch=micro_batch)
                        if mem.total > c.memory_bytes:
                            why = (f"needs {mem.total / GIB:.1f} GiB of {c.memory_bytes / GIB:.0f} GiB "
                                   f"(weights+grads+optimizer {mem.states / GIB:.1f}, "
                                   f"activations {mem.activations / GIB:.1f}, reserve {mem.reserve / GIB:.1f})")
                            plans.append(Plan(dp, cp, tp, label, mode, mem, False, why, overlap_tp=overlaps[0],
                                              **shape))
                        else:
                            candidates += [(dp, cp, tp, label, kind, u, mode, mem, layers, {**shape, "overlap_tp": o})
                                           for o in overlaps]
    jobs = sorted({(shape["micro_batch"], shape["overlap_tp"], cp, tp, kind, u)
                   for _, cp, tp, _, kind, u, *_, shape in candidates},
                  key=lambda job: (-job[2] * job[3], job))  # the biggest meshes first: they take longest
    layer_job = partial(_price_layer, m, c, seq, mfu)
    key = (m, c, seq, mfu)
    missing = [job for job in jobs if (key, job) not in _LAYERS]
    simulated = _run_jobs(layer_job, missing, _workers(workers, len(missing)), progress)
    _LAYERS.update({(key, job): layer for job, layer in simulated.items()})
    layers_priced = {job: _LAYERS[key, job] for job in jobs}
    for dp, cp, tp, label, kind, u, mode, mem, layers, shape in candidates:
        micro_batch = shape["micro_batch"]
        layer = layers_priced[micro_batch, shape["overlap_tp"], cp, tp, kind, u]
        if isinstance(layer, str):
            plans.append(Plan(dp, cp, tp, label, mode, mem, False, layer, **shape))
            continue
        pp, v, count, z = shape["pp"], shape["v"], shape["microbatches"], shape["zero"]
        busiest = max(sum(layers[r + k * pp] for k in range(v)) for r in range(pp))  # layers on the busiest rank
        per_step = count * busiest  # layer passes per step on that GPU
        forward_extra, backward_extra = _attention_repriced(m, c, seq, micro_batch, cp, tp, mfu, attention_efficiency)
        forward = layer.forward_compute + forward_extra
        compute = per_step * (layer.compute + forward_extra + backward_extra + (forward if mode == "full" else 0.0))
        exposed = {axis: per_step * t for axis, t in layer.exposed.items()}
        replicas = tuple(range(0, dp * cp * tp, tp))  # rank 0's dp·cp replicas (pp is the slowest axis)
        link = c.link(replicas)
        # each micro-batch crosses the busiest rank's 2v boundaries: v activations in, v gradients back
        exposed["pp"] = 2 * v * count * pipeline_transfer_time(m, seq, micro_batch, cp, tp, c.link((0, dp * cp * tp))) \
            if pp > 1 else 0.0
        if z == 3:
            exposed["dp_cp"] += per_step * weight_gather_exposed(m.layer_parameters(tp), dp * cp, link,
                                                                 forward, compute / per_step - forward)
        idle = per_step * layer.idle
        busy = compute + sum(exposed.values()) + idle  # per step on the busiest pipeline rank, before the bubble
        bubble = busy * bubble_share(pp, count, v)
        exposed["dp_cp"] += gradient_sync_time(mem.parameters, z, DTYPE_BYTES[grad_dtype], dp * cp, link,
                                               count if z >= 2 else 1)
        step = compute + sum(exposed.values()) + idle + bubble
        why = f"uses {mem.total / GIB:.1f} GiB of {c.memory_bytes / GIB:.0f} GiB"
        plans.append(Plan(dp, cp, tp, label, mode, mem, True, why, step, compute, exposed, idle, bubble=bubble, **shape))
    return sorted(plans, key=_rank)


def _choices(name: str, value, kind: type, valid: Callable[[object], bool]) -> tuple:
    """``value`` as a tuple of the values to try: one ``kind`` or an iterable of them, each ``valid``, in the order
    given (duplicates dropped)."""
    values = (value,) if isinstance(value, kind) else tuple(value) \
        if isinstance(value, Iterable) and not isinstance(value, str) else ()
    if not values or not all(valid(v) for v in values):
        raise ValueError(f"{name} must be {'an' if kind is int else 'a'} {kind.__name__} or several to try, got {value!r}")
    return tuple(dict.fromkeys(values))


def _price_layer(m: Model, c: Cluster, seq: int, mfu: float, job: tuple) -> LayerTime | str:
    """``price_layer`` of ``job`` = (micro_batch, overlap_tp, cp, tp, attention, ulysses)."""
    micro_batch, overlap, *mesh = job
    return price_layer(m, c, seq, micro_batch, mfu, overlap, tuple(mesh))


def fewest_gpus(model: Model | str, seq: int, cluster: Cluster | str, *, gpus: int = 1, micro_batch: int = 1,
                global_batch_tokens: int = 16 * 2**20, grad_dtype: str = "fp32", reserve: float = RESERVE_BYTES,
                limit: int = 2**20) -> Plan | None:
    """The smallest memory plan on the fewest GPUs (``gpus`` · 2^k, k = 0, 1, ...; at most ``limit``) on which
    ``model`` fits at all, or None: the answer to "what would fit" when ``plan`` finds nothing. Memory only
    (nothing is simulated): each (pp, dp, cp, tp) with tp inside a node, 1F1B, ring attention, full recompute
    and ZeRO 3 (the least memory each split can need); its ``why`` names the split and its memory."""
    m, c = as_model(model), as_cluster(cluster)
    sequences = global_batch_tokens // seq
    while gpus <= limit:
        best = None
        for pp, tp, cp, dp in _meshes(gpus, c, dict.fromkeys(("pp", "dp", "cp", "tp")), None, None, True):
            if _cannot_split(m, seq, sequences, micro_batch, dp, cp, tp):  # tp_within_node: tp divides the node
                continue
            count = sequences // (dp * micro_batch)
            layers = _pipelines(m, pp, count, (1,))[0][1]
            if isinstance(layers, str):
                continue
            mem = budget(m, (dp, cp, tp), seq, micro_batch, recompute="full", zero=3, grad_dtype=grad_dtype,
                         reserve=reserve, pp=pp, n_microbatches=count, layers_per_stage=None if pp == 1 else layers)
            if mem.total <= c.memory_bytes and (best is None or mem.total < best.memory.total):
                why = (f"fits on {gpus} GPUs as pp={pp} dp={dp} cp={cp} tp={tp}, ZeRO 3, full recompute: "
                       f"{mem.total / GIB:.1f} GiB of {c.memory_bytes / GIB:.0f} GiB")
                best = Plan(dp, cp, tp, "ring" if cp > 1 else "-", "full", mem, True, why, pp=pp, microbatches=count,
                            zero=3)
        if best is not None:
            return best
        gpus *= 2
    return None


# One simulated layer per (model, cluster, seq, mfu) and (micro-batch, overlap, mesh, attention): a second plan()
# of the same case (other memory settings, batch, recompute or search space) simulates nothing again.
_LAYERS: dict[tuple, "LayerTime | str"] = {}


def clear_cache() -> None:
    """Forget the layers simulated so far (the next ``plan`` simulates every one again)."""
    _LAYERS.clear()


def _meshes(gpus: int, c: Cluster, fixed: dict[str, int | None], max_tp: int | None, max_pp: int | None,
            tp_within_node: bool) -> list[tuple[int, int, int, int]]:
    """(pp, tp, cp, dp) with pp·dp·cp·tp = ``gpus`` in the search space: the ``fixed`` axes as given, tp <= ``max_tp``,
    pp <= ``max_pp``, and with ``tp_within_node`` tp dividing the node (its group on one node, as tp is innermost)."""
    for axis, value in fixed.items():
        if value is not None and (int(value) != value or value < 1 or gpus % value):
            raise ValueError(f"{axis}={value} must be a positive divisor of gpus={gpus}")
    for name, cap in (("max_tp", max_tp), ("max_pp", max_pp)):
        if cap is not None and cap < 1:
            raise ValueError(f"{name} must be >= 1, got {cap}")
    node = c.gpus_per_node or gpus
    meshes = []
    for pp in _divisors(gpus):
        for tp in _divisors(gpus // pp):
            for cp in _divisors(gpus // (pp * tp)):
                mesh = {"pp": pp, "tp": tp, "cp": cp, "dp": gpus // (pp * tp * cp)}
                if any(v is not None and mesh[axis] != v for axis, v in fixed.items()):
                    continue
                if (max_tp is not None and tp > max_tp) or (max_pp is not None and pp > max_pp) \
                        or (tp_within_node and node % tp):
                    continue
                meshes.append((pp, tp, cp, mesh["dp"]))
    if not meshes:
        raise ValueError(f"no (pp, dp, cp, tp) of {gpus} GPUs satisfies pp={fixed['pp']}, dp={fixed['dp']}, "
                         f"cp={fixed['cp']}, tp={fixed['tp']}, max_tp={max_tp}, max_pp={max_pp}, "
                         f"tp_within_node={tp_within_node}")
    return meshes


def evaluate(model: Model | str, seq: int, cluster: Cluster | str, dp: int, cp: int, tp: int, *, pp: int = 1,
             virtual_stages: int = 1, zero: int = 1, attention: str = "ring", ulysses: int | None = None,
             recompute: str = "selective", **options) -> Plan:
    """One split, priced as ``plan`` prices every split: pp · dp · cp · tp GPUs (``virtual_stages`` chunks per
    pipeline rank), ``attention`` over cp (a kind with both groups, as USP, with ``ulysses`` ranks in its Ulysses
    axis), ``recompute``, ZeRO stage ``zero``; ``options`` are ``plan``'s (micro_batch, mfu, reserve, ...). Its
    ``.fits`` and ``.why`` say whether it fits and runs."""
    two_groups = len(attention_kind(attention).groups) == 2
    label = "-" if cp == 1 else (f"{attention}(u={ulysses})" if two_groups else attention)
    plans = plan(model, seq, pp * dp * cp * tp, cluster, pp=pp, dp=dp, cp=cp, tp=tp, attentions=(attention,),
                 recompute=(recompute,), zero=zero, virtual_stages=(virtual_stages,), **options)
    matching = [p for p in plans if p.attention in (label, "-") and p.v in (virtual_stages, 1)]
    if not matching:
        raise ValueError(f"{attention} has no split with ulysses={ulysses} on cp={cp}: "
                         f"{sorted({p.attention for p in plans})}")
    exact = [p for p in matching if p.v == virtual_stages]
    if not exact:
        raise ValueError(f"virtual_stages={virtual_stages} does not run on pp={pp}: the layers or the "
                         f"{matching[0].microbatches} micro-batches do not split (interleaving needs m >= pp)")
    return exact[0]


def attention_core_time(m: Model, c: Cluster, seq: int, micro_batch: int, cp: int, tp: int,
                        efficiency: float | tuple[float, float] | AttentionKernel | str) -> tuple[float, float]:
    """(forward, backward) seconds of one layer's causal attention core per rank at ``efficiency``
    (``attention_shares``: forward share f, backward share g of ``c.peak_flops``):

        b · F / (f · peak),  b · 2.5 F / (g · peak),   F = 2 · s² · head_dim · H / (cp · tp)  (``causal_attention_flops``).
    """
    shares = attention_shares(efficiency)
    return tuple(micro_batch * flops / (share * c.peak_flops)
                 for flops, share in zip(causal_attention_flops(m, seq, cp, tp), shares))


def _attention_repriced(m: Model, c: Cluster, seq: int, micro_batch: int, cp: int, tp: int, mfu: float,
                        efficiency: float | tuple[float, float] | AttentionKernel | str | None) -> tuple[float, float]:
    """Seconds to add to a layer's (forward, backward) compute when its causal attention core runs at
    ``efficiency`` instead of ``mfu`` (None: no change). A correction of the busiest rank's
    compute, as ``causal_overcount`` is: the timeline is not laid out again."""
    if efficiency is None:
        return 0.0, 0.0
    at_kernel = attention_core_time(m, c, seq, micro_batch, cp, tp, efficiency)
    at_mfu = attention_core_time(m, c, seq, micro_batch, cp, tp, mfu)
    return tuple(k - g for k, g in zip(at_kernel, at_mfu))


class _Finished:
    """The jobs of ``futures`` as they finish, sized (so ``tqdm`` shows a total)."""

    def __init__(self, futures: dict) -> None:
        self.futures = futures

    def __len__(self) -> int:
        return len(self.futures)

    def __iter__(self) -> Iterator:
        return (self.futures[f] for f in as_completed(self.futures))


def _run_jobs(job_fn: Callable, jobs: list, workers: int, progress: Callable[[Iterable], Iterable]) -> dict:
    """{job: job_fn(job)}, in this process (``workers`` <= 1) or in ``workers`` spawned ones."""
    if workers <= 1 or len(jobs) <= 1:
        return {job: job_fn(job) for job in progress(jobs)}
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(job_fn, job): job for job in jobs}
        for _ in progress(_Finished(futures)):  # wait for each, showing progress
            pass
        return {job: f.result() for f, job in futures.items()}


# Fewest layer simulations worth spawning processes for (workers=None). Measured on 2 cores at load ~9, Llama 3 8B
# on dgx-h100: 2 workers took 9.9x, 4.1x and 3.0x the time of 1 for 26, 45 and 104 simulations (8, 16, 64 GPUs):
# spawning and importing torch outweighs simulations of ~0.1 s each until a few hundred of them.
PROCESSES_FROM = 256


def _workers(workers: int | None, jobs: int) -> int:
    """The processes to run ``jobs`` simulations in: ``workers``, or for None one per CPU from ``PROCESSES_FROM``."""
    if workers is not None:
        return workers
    return default_workers() if jobs >= PROCESSES_FROM else 1


def default_workers() -> int:
    """One process per CPU this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cannot_split(m: Model, seq: int, sequences: int, micro_batch: int, dp: int, cp: int, tp: int) -> str:
    if m.n_heads % tp:
        return f"n_heads={m.n_heads} is not divisible by tp={tp}"
    if seq % (2 * cp * tp):
        return f"seq={seq} does not split into 2·cp·tp = {2 * cp * tp} zigzag chunks"
    if sequences % (dp * micro_batch):
        return f"the batch of {sequences} sequences does not split into dp={dp} × micro_batch={micro_batch}"
    return ""


def _rank(p: Plan) -> tuple:
    return (not p.fits, p.step_time if p.fits else p.memory.total or float("inf"), p.tp, p.cp, p.attention, p.recompute,
            p.pp, p.v, p.zero, p.dp, p.micro_batch, p.overlap_tp)


def table(plans: list[Plan], top: int | None = None, fmt: str = "markdown") -> str:
    """A table of ``plans`` (the first ``top``), best first: "markdown" (default), "text" or "html". Columns "b"
    (sequences per micro-batch) and "overlap tp" appear when some plan has micro_batch > 1 or overlap_tp on."""
    shown = plans[:top]
    extra = [(name, value) for name, value, show in (
        ("b", lambda p: str(p.micro_batch), any(p.micro_batch != 1 for p in shown)),
        ("overlap tp", lambda p: "yes" if p.overlap_tp else "no", any(p.overlap_tp for p in shown))) if show]
    head = ("#", "pp", "dp", "cp", "tp", "v", "m", *(name for name, _ in extra), "zero", "attention", "recompute",
            "step time", "compute", "exposed tp", "exposed cp", "exposed pp", "exposed dp×cp", "bubble", "memory/GPU",
            "fits")
    rows = []
    for i, p in enumerate(shown, start=1):
        times = ([format_seconds(p.step_time), format_seconds(p.compute)]
                 + [format_seconds(p.exposed[a]) for a in EXPOSED] + [format_seconds(p.bubble)]) if p.runs else ["-"] * 7
        memory = f"{p.memory.total / GIB:.1f} GiB" if p.memory.total else "-"
        rows.append((str(i), str(p.pp), str(p.dp), str(p.cp), str(p.tp), str(p.v), str(p.microbatches or "-"),
                     *(value(p) for _, value in extra), str(p.zero), p.attention, p.recompute, *times, memory,
                     ("yes: " if p.fits else "no: ") + p.why))
    return Table(head, rows, frozenset(head) - {"attention", "recompute", "fits", "overlap tp"}).render(fmt)
