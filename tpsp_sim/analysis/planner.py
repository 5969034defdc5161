"""``ts.plan``: how to split a long-context training run over TP × CP × DP on a cluster, and will it fit.

For every factorisation gpus = dp · cp · tp (tp innermost, then cp, then dp: Megatron's order, so
a tp group is tp neighbouring ranks), every context-parallel attention (ring, Ulysses, USP with each
Ulysses size u, 1 < u < cp) and every recompute mode:

1. memory per GPU: ``ts.memory.budget`` with the same defaults (Megatron's accounting: bf16 weights,
   fp32 master weights and main gradients, Adam with the distributed optimizer over dp·cp (``zero=1``),
   Table 2 activations, the output layer's logits, a 2 GiB reserve); a plan that does not fit in ``Cluster.memory_bytes``
   is listed with why, and not simulated;
2. one layer, forward and backward, simulated on meta tensors on a (cp, tp) mesh of virtual ranks
   (``simulate_layer`` in layer.py: the hybrid TP+SP × CP block, Llama-shaped for "swiglu" models; one
   rank simulated, every rank's trace written from its own, as the layer is symmetric), laid out
   on the cluster by ``ts.timeline`` with compute at ``mfu`` × peak (each call priced on its group's
   link). The busiest rank's compute, exposed communication per axis and idle time, times the
   layers and the micro-batches of a step (``global_batch_tokens`` / (dp · micro_batch · seq)),
   plus the gradient synchronisation over dp·cp once per step (``gradient_sync_time``, not overlapped),
   is the step time. "full" recompute adds the layer's forward compute again.

Causal attention: the simulator's kernels compute a masked (diagonal) tile whole, as a square, and
count its FLOPs so; a causal flash kernel skips the masked half. Left as is, cp = 1 (one s × s
diagonal) would be charged twice the attention FLOPs it needs, and context parallelism would look
better than it is. So the busiest rank's compute is reduced by half of its diagonal tiles
(``causal_overcount``), forward and backward. This corrects the compute only: a rank
whose timeline waited on a transfer under the masked half is not re-laid out.

What it ignores is listed, complete, in ``IGNORES``. Among it: pipeline parallelism (the pp axis is
another engineer's; ``_meshes`` is the seam where it joins the search); one stated MFU (default 0.5)
for all compute; overlap of the gradient synchronisation with backward (Megatron's
``--overlap-grad-reduce`` hides most of it: the step times here are upper bounds on it). Attention
kernels are assumed flash-style (no s × s scores kept, tiles recomputed in backward, as
``ring_attention`` does), so "selective" (Table 2's row: keep everything but the scores) costs no
extra compute and "none" would be the same plan.
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
from .cluster import Cluster, Link, cluster as as_cluster
from .cost import collective_time, format_seconds
from .layer import AXES, LayerTime, causal_attention_flops, price_layer
from .memory import DTYPE_BYTES, RESERVE_BYTES, Budget, budget
from .models import Model, model as as_model

PLANNED_RECOMPUTE = ("selective", "full")  # memory.RECOMPUTE's "none" is "selective" under flash attention
GIB = 2**30
IGNORES = ("pipeline parallelism (the pp axis is not searched); ZeRO 3's per-layer weight all-gathers; the embedding "
           "and output layer's compute (their memory is counted); kernel efficiency beyond one MFU for all compute "
           "unless attention_efficiency is given (FlashAttention-3 reaches 0.75 of peak, so attention-bound long-context "
           "steps are priced slow by default; its backward is taken at the forward's efficiency); overlap of the "
           "gradient synchronisation with backward (counted fully exposed); "
           "Megatron's overlap of TP's all-gathers (overlap_tp hides its reduce-scatters only); the sequence-parallel "
           "norm-gradient all-reduce; NCCL's tree all_reduce (rings only); network contention between groups; "
           "allocator fragmentation beyond the reserve. Attention kernels are assumed flash-style (no scores kept), "
           "so recompute 'selective' costs no extra compute.")


@dataclass(frozen=True)
class Plan:
    """One way to run the step: mesh, attention, recompute; its predicted time (seconds) and memory (bytes per GPU)."""

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
    exposed: dict[str, float] = field(default_factory=dict)  # per axis: "tp", "cp", "dp_cp"
    idle: float = 0.0

    @property
    def runs(self) -> bool:
        return self.step_time is not None


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


def plan(model: Model | str, seq: int, gpus: int, cluster: Cluster | str, *, micro_batch: int = 1,
         global_batch_tokens: int = 16 * 2**20, mfu: float = 0.5, attentions: Iterable[str] = tuple(ATTENTIONS),
         recompute: Iterable[str] = PLANNED_RECOMPUTE, zero: int = 1, grad_dtype: str = "fp32",
         reserve: float = RESERVE_BYTES, overlap_tp: bool = False, max_tp: int | None = None,
         tp_within_node: bool = False, dp: int | None = None, cp: int | None = None, tp: int | None = None,
         attention_efficiency: float | None = None, progress: Callable[[Iterable], Iterable] = iter, workers: int = 1) -> list[Plan]:
    """Every (dp, cp, tp) × attention × recompute plan for ``model`` at ``seq`` tokens on ``gpus`` GPUs of
    ``cluster``, best first: the plans that fit by step time, then the rest (module docstring).

    ``attention_efficiency``: the attention core's share of peak when it differs from ``mfu`` (GEMMs and the
    rest stay at ``mfu``), e.g. ``FLASH_ATTENTION_3_H100``; None (default): one ``mfu`` for all compute.
    Search space: ``dp``, ``cp``, ``tp`` fix an axis; ``max_tp`` caps tp; ``tp_within_node`` keeps each tp group
    on one node. ``evaluate`` prices one split. A step trains ``global_batch_tokens`` tokens (default 16M, Llama 3's batch): global_batch_tokens /
    seq sequences, in micro-batches of ``micro_batch`` sequences per dp replica. ``overlap_tp``: hide
    TP's backward reduce-scatters behind the weight-gradient matmuls (``ts.timeline``). ``cluster``: a
    ``Cluster`` or a key of ``ts.cost.CLUSTERS``, as ``ts.timeline`` takes.

    ``zero``, ``grad_dtype`` and ``reserve`` are ``ts.memory.budget``'s (the same defaults). One layer is
    simulated per distinct (cp, tp, attention), shared by every dp and recompute mode (dp adds only the
    gradient synchronisation, priced in closed form); ``workers`` > 1 runs these simulations
    in that many processes (the plans are the same). ``progress`` wraps the simulations as they finish,
    a sized iterable (e.g. ``tqdm.tqdm``). Deterministic: the same arguments give the same plans.
    """
    m, c = as_model(model), as_cluster(cluster)
    sequences = global_batch_tokens // seq
    if sequences < 1:
        raise ValueError(f"global_batch_tokens={global_batch_tokens} is less than one sequence of {seq} tokens")
    attentions, modes = tuple(attentions), tuple(recompute)
    unknown = [a for a in attentions if a not in ATTENTIONS] + [r for r in modes if r not in PLANNED_RECOMPUTE]
    if unknown:
        raise ValueError(f"unknown attention or recompute {unknown}; attentions are {tuple(ATTENTIONS)}, "
                         f"recompute {PLANNED_RECOMPUTE}")
    candidates: list[tuple[int, int, int, str, str, int, str, Budget]] = []
    plans: list[Plan] = []
    fixed = {"dp": dp, "cp": cp, "tp": tp}
    for tp, cp, dp in _meshes(gpus, c, fixed, max_tp, tp_within_node):
        reason = _cannot_split(m, seq, sequences, micro_batch, dp, cp, tp)
        if reason:  # one row for the mesh, whatever the attention and recompute
            plans.append(Plan(dp, cp, tp, "-", "-", Budget(0, 0, 0, 0, 0, 0), False, reason))
            continue
        for label, kind, u in _attention_kinds(cp, attentions):
            for mode in modes:
                mem = budget(m, (dp, cp, tp), seq, micro_batch, recompute=mode, zero=zero,
                             grad_dtype=grad_dtype, reserve=reserve, attention=kind, ulysses=u)
                if mem.total > c.memory_bytes:
                    why = (f"needs {mem.total / GIB:.1f} GiB of {c.memory_bytes / GIB:.0f} GiB "
                           f"(weights+grads+optimizer {mem.states / GIB:.1f}, "
                           f"activations {mem.activations / GIB:.1f}, reserve {mem.reserve / GIB:.1f})")
                    plans.append(Plan(dp, cp, tp, label, mode, mem, False, why))
                else:
                    candidates.append((dp, cp, tp, label, kind, u, mode, mem))
    jobs = sorted({(cp, tp, kind, u) for _, cp, tp, _, kind, u, _, _ in candidates},
                  key=lambda job: (-job[0] * job[1], job))  # the biggest meshes first: they take longest
    layer_job = partial(price_layer, m, c, seq, micro_batch, mfu, overlap_tp)
    key = (m, c, seq, micro_batch, mfu, overlap_tp)
    missing = [job for job in jobs if (key, job) not in _LAYERS]
    _LAYERS.update({(key, job): layer for job, layer in _run_jobs(layer_job, missing, workers, progress).items()})
    layers = {job: _LAYERS[key, job] for job in jobs}
    for dp, cp, tp, label, kind, u, mode, mem in candidates:
        layer = layers[cp, tp, kind, u]
        if isinstance(layer, str):
            plans.append(Plan(dp, cp, tp, label, mode, mem, False, layer))
            continue
        per_step = sequences // (dp * micro_batch) * m.n_layers  # layer passes per step on each GPU
        forward_extra, backward_extra = _attention_repriced(m, c, seq, micro_batch, cp, tp, mfu, attention_efficiency)
        forward = layer.forward_compute + forward_extra
        compute = per_step * (layer.compute + forward_extra + backward_extra + (forward if mode == "full" else 0.0))
        exposed = {axis: per_step * t for axis, t in layer.exposed.items()}
        group = tuple(range(0, gpus, tp))  # rank 0's dp·cp replicas
        exposed["dp_cp"] += gradient_sync_time(mem.parameters, zero, DTYPE_BYTES[grad_dtype], dp * cp, c.link(group))
        step = compute + sum(exposed.values()) + per_step * layer.idle
        why = f"uses {mem.total / GIB:.1f} GiB of {c.memory_bytes / GIB:.0f} GiB"
        plans.append(Plan(dp, cp, tp, label, mode, mem, True, why, step, compute, exposed, per_step * layer.idle))
    return sorted(plans, key=_rank)


# One simulated layer per (model, cluster, seq, micro-batch, mfu, overlap, mesh, attention): a second plan()
# of the same case (other memory settings, batch, recompute or search space) simulates nothing again.
_LAYERS: dict[tuple, "LayerTime | str"] = {}


def clear_cache() -> None:
    """Forget the layers simulated so far (the next ``plan`` simulates every one again)."""
    _LAYERS.clear()


def _meshes(gpus: int, c: Cluster, fixed: dict[str, int | None], max_tp: int | None,
            tp_within_node: bool) -> list[tuple[int, int, int]]:
    """(tp, cp, dp) with dp·cp·tp = ``gpus`` in the search space: the ``fixed`` axes as given, tp <= ``max_tp``,
    and with ``tp_within_node`` tp dividing the node (its group on one node, as tp is innermost)."""
    for axis, value in fixed.items():
        if value is not None and (int(value) != value or value < 1 or gpus % value):
            raise ValueError(f"{axis}={value} must be a positive divisor of gpus={gpus}")
    if max_tp is not None and max_tp < 1:
        raise ValueError(f"max_tp must be >= 1, got {max_tp}")
    node = c.gpus_per_node or gpus
    meshes = []
    for tp in _divisors(gpus):
        for cp in _divisors(gpus // tp):
            mesh = {"tp": tp, "cp": cp, "dp": gpus // (tp * cp)}
            if any(v is not None and mesh[axis] != v for axis, v in fixed.items()):
                continue
            if (max_tp is not None and tp > max_tp) or (tp_within_node and node % tp):
                continue
            meshes.append((tp, cp, mesh["dp"]))
    if not meshes:
        raise ValueError(f"no (dp, cp, tp) of {gpus} GPUs satisfies dp={fixed['dp']}, cp={fixed['cp']}, "
                         f"tp={fixed['tp']}, max_tp={max_tp}, tp_within_node={tp_within_node}")
    return meshes


def evaluate(model: Model | str, seq: int, cluster: Cluster | str, dp: int, cp: int, tp: int, *,
             attention: str = "ring", ulysses: int | None = None, recompute: str = "selective", **options) -> Plan:
    """One split, priced as ``plan`` prices every split: dp · cp · tp GPUs, ``attention`` over cp (a kind
    with both groups, as USP, with ``ulysses`` ranks in its Ulysses axis), ``recompute``; ``options`` are ``plan``'s (micro_batch, mfu,
    zero, reserve, ...). Its ``.fits`` and ``.why`` say whether it fits and runs."""
    two_groups = len(attention_kind(attention).groups) == 2
    label = "-" if cp == 1 else (f"{attention}(u={ulysses})" if two_groups else attention)
    plans = plan(model, seq, dp * cp * tp, cluster, dp=dp, cp=cp, tp=tp, attentions=(attention,),
                 recompute=(recompute,), **options)
    matching = [p for p in plans if p.attention in (label, "-")]
    if not matching:
        raise ValueError(f"{attention} has no split with ulysses={ulysses} on cp={cp}: "
                         f"{sorted({p.attention for p in plans})}")
    return matching[0]


def _attention_repriced(m: Model, c: Cluster, seq: int, micro_batch: int, cp: int, tp: int, mfu: float,
                        efficiency: float | None) -> tuple[float, float]:
    """Seconds to add to a layer's (forward, backward) compute when its causal attention core runs at
    ``efficiency`` of peak instead of ``mfu`` (None: no change). A correction of the busiest rank's
    compute, as ``causal_overcount`` is: the timeline is not laid out again."""
    if efficiency is None:
        return 0.0, 0.0
    if not 0 < efficiency <= 1:
        raise ValueError(f"attention_efficiency must be in (0, 1], got {efficiency}")
    scale = 1 / (efficiency * c.peak_flops) - 1 / (mfu * c.peak_flops)
    return tuple(micro_batch * flops * scale for flops in causal_attention_flops(m, seq, cp, tp))


def gradient_sync_time(parameters: float, zero: int, grad_bytes: int, replicas: int, link: Link) -> float:
    """Seconds of the once-per-step gradient synchronisation of the ``parameters`` a GPU holds over the dp·cp
    ``replicas`` (not overlapped with backward).

    ZeRO 0: an all_reduce of the gradients (``grad_bytes`` each; Megatron reduces its fp32 main gradients
    in fp32). ZeRO ≥ 1 (Megatron's distributed optimizer): a reduce_scatter of the gradients, then an
    all_gather of the updated bf16 weights (each replica's 1/replicas shard). ZeRO 3's per-layer weight
    gathers in forward and backward are not priced (``IGNORES``).
    """
    if zero == 0:
        return collective_time("all_reduce", int(grad_bytes * parameters), replicas, link)
    return (collective_time("reduce_scatter", int(grad_bytes * parameters), replicas, link)
            + collective_time("all_gather", int(2 * parameters) // replicas, replicas, link))


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
    return (not p.fits, p.step_time if p.fits else p.memory.total or float("inf"), p.tp, p.cp, p.attention, p.recompute)


def table(plans: list[Plan], top: int | None = None) -> str:
    """A Markdown table of ``plans`` (the first ``top``), best first."""
    head = ("#", "dp", "cp", "tp", "attention", "recompute", "step time", "compute", "exposed tp", "exposed cp",
            "exposed dp×cp", "memory/GPU", "fits")
    rows = []
    for i, p in enumerate(plans[:top], start=1):
        times = ([format_seconds(p.step_time), format_seconds(p.compute)]
                 + [format_seconds(p.exposed[a]) for a in AXES]) if p.runs else ["-"] * 5
        memory = f"{p.memory.total / GIB:.1f} GiB" if p.memory.total else "-"
        rows.append((str(i), str(p.dp), str(p.cp), str(p.tp), p.attention, p.recompute, *times, memory,
                     ("yes: " if p.fits else "no: ") + p.why))
    return Table(head, rows, frozenset(head) - {"attention", "recompute", "fits"}).render("markdown")
