"""One transformer layer of a (cp, tp) split, simulated on meta tensors and priced on a cluster: what
``ts.plan`` multiplies by the layers and micro-batches of a step.

``simulate_layer`` records the layer's forward and backward (bytes and FLOPs) on cp·tp virtual ranks;
``layer_time`` lays it out with ``ts.timeline`` and corrects the busiest rank's compute for what a
causal flash kernel skips (``causal_overcount``); ``price_layer`` does both, or says why the split
cannot run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..context_parallel.kind import LocalShape
from ..context_parallel.registry import attention_kind
from ..core.errors import SimulationError
from ..core.mesh import init_device_mesh
from ..core.trace import CommTrace
from ..hybrid.block import ParallelTransformerBlock
from ..launch import run
from ..models.gpt import TransformerBlock
from ..models.llama import LlamaBlock
from ..sim.solo import Symmetric, run_symmetric
from .cluster import Cluster
from .models import Model
from .replay import timeline

AXES = ("tp", "cp", "dp_cp")  # the columns of exposed communication


def simulate_layer(m: Model, cp: int, tp: int, attention: str, seq: int, micro_batch: int, ulysses: int = 1,
                   *, every_rank: bool = False) -> CommTrace:
    """The trace (with FLOPs) of one layer's forward and backward on a (cp, tp) mesh, on meta tensors.

    A kind with both groups ("usp") runs on a (cp/ulysses, ulysses, tp) mesh whose two context axes are
    named "cp_ring" and "cp_ulysses". Raises ValueError (or a ``SimulationError``) if the shapes do not split.
    Every rank's trace is written from the few ranks ``symmetric_layer`` simulates; ``every_rank=True``
    simulates every rank instead (the same trace: tests/test_solo.py compares them on a grid).
    """
    if every_rank:
        return run(_layer, _dense(m), cp, tp, attention, seq, micro_batch, ulysses, world_size=cp * tp,
                   count_flops=True).trace
    return symmetric_layer(m, cp, tp, attention, seq, micro_batch, ulysses).trace()


def symmetric_layer(m: Model, cp: int, tp: int, attention: str, seq: int, micro_batch: int,
                    ulysses: int = 1) -> Symmetric:
    """``simulate_layer``'s layer as a ``Symmetric``: the layer is the same program on every rank up to a
    translation of the mesh (TP+SP, and context parallelism in the balanced zigzag layout), so rank 0 is
    simulated alone (tp/n_kv_heads ranks when tp > n_kv_heads replicates K/V heads: ``ts.sim.solo``), and
    ``ts.timeline`` lays it out replaying only the ranks the cluster's nodes tell apart."""
    two_groups = len(attention_kind(attention).groups) == 2
    shape = (cp // ulysses, ulysses, tp) if two_groups else (cp, tp)
    return run_symmetric(_layer, _dense(m), cp, tp, attention, seq, micro_batch, ulysses, shape=shape,
                         count_flops=True)


def _dense(m: Model) -> torch.nn.Module:
    """The dense block of ``m`` on meta tensors, bf16."""
    if m.q_dim != m.d_model:
        raise ValueError(f"the simulated blocks have n_heads · head_dim = d_model; {m.name} has "
                         f"{m.n_heads} x {m.head_dim} = {m.q_dim} != {m.d_model}")
    with torch.device("meta"):
        if m.mlp == "swiglu":
            return LlamaBlock(m.d_model, m.n_heads, m.n_kv_heads, m.d_ff).to(torch.bfloat16)
        return TransformerBlock(m.d_model, m.n_heads, m.d_ff).to(torch.bfloat16)


def _layer(comm, dense, cp: int, tp: int, attention: str, seq: int, micro_batch: int, ulysses: int) -> None:
    if len(attention_kind(attention).groups) == 2:
        mesh = init_device_mesh(comm, (cp // ulysses, ulysses, tp), mesh_dim_names=("cp_ring", "cp_ulysses", "tp"))
        context = (mesh["cp_ulysses"], mesh["cp_ring"])
    else:
        mesh = init_device_mesh(comm, (cp, tp), mesh_dim_names=("cp", "tp"))
        context = mesh["cp"]
    block = ParallelTransformerBlock.from_dense(dense, tp=mesh["tp"], cp=context, mode="tp_sp", attention=attention,
                                                layout="zigzag")
    x = torch.empty(micro_batch, seq // cp // tp, dense.d_model, dtype=torch.bfloat16, device="meta",
                    requires_grad=True)
    block(x).float().sum().backward()


@dataclass(frozen=True)
class LayerTime:
    compute: float
    forward_compute: float
    exposed: dict[str, float]
    idle: float


def causal_attention_flops(m: Model, seq: int, cp: int, tp: int) -> tuple[float, float]:
    """(forward, backward) FLOPs of one sequence's causal attention core per rank and layer, as a causal
    flash kernel computes them: Q Kᵀ and P V over the unmasked half, 2 · seq² · head_dim · n_heads in all,
    split evenly over the cp · tp ranks (zigzag rings and Ulysses' heads both balance it); backward 2.5×
    (five tile matmuls against two). Whatever the attention kind."""
    forward = 2 * seq * seq * m.head_dim * m.n_heads / (cp * tp)
    return forward, 2.5 * forward


def causal_overcount(m: Model, seq: int, cp: int, tp: int, attention: str, ulysses: int = 1) -> tuple[float, float]:
    """(forward, backward) FLOPs per rank, layer and sequence that the simulator counts beyond a causal
    flash kernel (which skips masked halves and recomputes S in backward: 5 tile matmuls, 2.5× forward):
    the kind's ``causal_excess`` (``ts.context_parallel.registry``) on this rank's attention input,
    H/tp query heads of seq/cp tokens in the zigzag layout. For ring attention, a ring of n = seq/cp
    tokens per rank counts one n × n diagonal tile whole (needed: half) and its half tiles exactly:

        forward  F = 2 · n² · d · H / tp;    backward 2.5 · F.
    """
    kind = attention_kind(attention)
    shape = LocalShape(1, m.n_heads // tp, max(m.n_kv_heads // tp, 1), seq // cp, m.head_dim)
    u, r = kind.sizes(cp, ulysses)
    return kind.causal_excess(shape, u, r, "zigzag")


def layer_time(trace: CommTrace | Symmetric, c: Cluster, mfu: float, overcount: tuple[float, float],
                overlap_tp: bool) -> LayerTime:
    tl = timeline(trace, c, mfu=mfu, overlap_tp=overlap_tp)
    r = max(tl.ranks, key=lambda rank: (tl.end(rank), -rank))  # the busiest rank
    forward_extra, backward_extra = (flops / (mfu * c.peak_flops) for flops in overcount)
    exposed = {axis: 0.0 for axis in AXES}
    for axis, seconds in tl.exposed_by_axis(r).items():
        # no axis: the subgroups of tp that sum replicated K/V weight gradients (t > n_kv_heads)
        exposed["cp" if axis and axis.startswith("cp") else axis or "tp"] += seconds
    forward = sum(s.end - s.start for s in tl.of(r, "compute") if s.phase == "forward")
    return LayerTime(tl.compute(r) - forward_extra - backward_extra, forward - forward_extra, exposed, tl.idle(r))


def price_layer(m: Model, c: Cluster, seq: int, micro_batch: int, mfu: float, overlap_tp: bool,
               job: tuple[int, int, str, int]) -> LayerTime | str:
    """One layer on the (cp, tp) mesh of ``job``, laid out on ``c``; or why it cannot run."""
    cp, tp, kind, u = job
    try:
        overcount = tuple(micro_batch * f for f in causal_overcount(m, seq, cp, tp, kind, u))
        return layer_time(symmetric_layer(m, cp, tp, kind, seq, micro_batch, u), c, mfu, overcount, overlap_tp)
    except (ValueError, SimulationError) as error:
        cause = error.__cause__ if isinstance(error, SimulationError) and error.__cause__ else error
        # without the rank ("rank 3: ", "rank 1 of its group: "): whichever rank raised first
        message = re.sub(r"^rank \d+[^:]*: ", "", str(cause).splitlines()[0])
        return f"cannot run: {message}"
