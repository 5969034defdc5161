"""Activation memory per rank: what autograd saves for backward, measured and predicted.

``saved_tensor_meter()`` (core/saved.py) counts the bytes of the distinct storages saved for backward while it is
open (``torch.autograd.graph.saved_tensors_hooks``, which are per thread, so each virtual rank
measures its own). ``activation_memory`` is Korthikanti et al. 2022's count per transformer layer
(16-bit activations, 1-byte dropout masks; s sequence, b batch, h hidden, a heads, t TP size):

    "none"   sbh (34 + 5as/h)              §4.1
    "tp"     sbh (10 + 24/t + 5as/(ht))    §4.2.1
    "tp_sp"  sbh/t (34 + 5as/h)            §4.2.2

Measured on ``ts.TransformerBlock`` / ``ts.ParallelTransformerBlock`` in bfloat16 with dropout on
(parameters excluded), term by term, per rank (under "tp" the first three rows are whole, under
"tp_sp" divided by t):

    term                                   paper     measured
    ln1, ln2 inputs                        4sbh      4sbh      + mean and rstd, [b, s, 1] each in the
                                                               activation dtype: 4 x 2bs bytes
    qkv, fc1 inputs (LayerNorm outputs)    4sbh      4sbh      under tp_sp the shard: g is fused with
                                                               the matmul and re-gathered in backward
    residual dropout masks                 2sbh      2sbh      bool, 1 byte
    q, k (for Q K^T), v (for P V)          6sbh/t    6sbh/t    copies made by matmul's batch folding
    softmax output, its dropout mask and   5as²b/t   5as²b/t   2 + 1 + 2 bytes per score
      the dropped probabilities
    proj input                             2sbh/t    2sbh/t
    fc1 output (GELU input), GELU output   16sbh/t   16sbh/t
    causal mask                            -         0         added as a bias, which saves nothing

So the meter is the paper's count plus the LayerNorm statistics, 8bs bytes per layer (8bs/t under
tp_sp): a fraction 8/(h(34 + 5as/h)) of the total, under 0.4% for h >= 64. The paper leaves them
out as small. Scalars (1/sqrt(d), 1/(1-p)) are not saved.

``budget(model, (dp, cp, tp), seq, micro_batch, recompute=...)`` is the whole memory of one GPU as
Megatron-LM counts it: 16-bit weights, fp32 master weights, fp32 main gradients and Adam's two moments
(18 bytes per parameter, divided by tp; ZeRO stage 1, the default, shards the master weights and
moments over dp·cp: 6 + 12/(dp·cp)), the activations of every layer (``layer_activations``), of the
embedding and of the output layer and loss (``output_activations``), and a reserve for the CUDA
context and NCCL. ``budget`` and ``ts.plan`` share these defaults.

With pipeline parallelism (``pp`` stages, ``virtual_stages`` chunks per rank, ``schedule``) each rank holds
its stages' layers, the first stage also the embedding, the last the output layer (and final norm), and the
activations of the micro-batches its schedule keeps in flight; ``budget`` reports the worst rank
(``Budget.stage``; Megatron reports the first).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from ..context_parallel.kind import LocalShape
from ..context_parallel.registry import attention_kind
from ..pipeline.registry import SCHEDULES, in_flight, schedule_class
from .models import Model, model as as_model

MODES = ("none", "tp", "tp_sp")
RECOMPUTE = ("none", "selective", "full")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def activation_memory(mode: str, seq: int, batch: int, hidden: int, heads: int, t: int = 1) -> float:
    """Korthikanti et al. 2022's activation bytes per transformer layer and rank (16-bit activations)."""
    s, b, h, a = seq, batch, hidden, heads
    if mode == "none":
        return s * b * h * (34 + 5 * a * s / h)
    if mode == "tp":
        return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))
    if mode == "tp_sp":
        return s * b * h / t * (34 + 5 * a * s / h)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def layer_activations(model: Model | str, seq: int, micro_batch: int, cp: int = 1, tp: int = 1,
                      recompute: str = "none", attention: str = "ring", ulysses: int = 1) -> float:
    """Activation bytes one GPU keeps for one layer under TP+SP (Korthikanti et al. 2022, Table 2),
    with the sequence split over ``cp`` context-parallel ranks (16-bit activations, 1-byte masks).

    With s' = seq/cp tokens per cp rank, b = micro_batch, h = d_model, f = d_ff, a = heads, t = tp,
    and K tensor-bytes per token (below):

        "none"       s'b·K/t + z·a·s'·s·b/t    Table 2, TP + SP:     sbh/t (34 + 5as/h) for GPT, cp = 1
        "selective"  s'b·K/t                   Table 2, + selective: 34·sbh/t for GPT
        "full"       2·s'bh/t                  the layer's input only (Table 2 writes 2sbh: its input
                                               without SP; with SP it is the rank's shard)

    GPT block (``mlp="gelu"``), Table 2 term by term: K = 18h + 4f — LayerNorm inputs 4h, qkv input
    2h, q k v 6h, proj input 2h, fc1 input 2h, fc1 and GELU outputs 4f, two residual dropout masks
    2h (= 34h at f = 4h; with q = n_heads · head_dim ≠ h: 10h + 8q + 4f); z = 5: the softmax output, its dropout mask and the dropped probabilities.
    This row is checked against ``saved_tensor_meter`` within 1% (tests/test_memory_budget.py).

    Llama block (``mlp="swiglu"``, no dropout), the same accounting: K = 12h + 4h·H_kv/H + 8f
    — RMSNorm inputs 4h, qkv input 2h, q 2h, k and v 4h·H_kv/H (grouped-query attention keeps the
    H_kv heads), o input 2h, MLP input 2h, gate and up outputs 4f, silu(gate) 2f and the product
    2f (SwiGLU keeps twice GELU's 4f); z = 2: the softmax output only. With q = H · head_dim and
    k = H_kv · head_dim written out: K = 8h + 4q + 4k + 8f. Megatron's formula charges every model
    GPT's 18h + 4f (its TODO: "query_projection_size potentially being different from hidden_size");
    for Llama 3 8B that is 131,072 bytes per token against these 167,936: the difference is SwiGLU's
    extra 4f (gate, silu(gate), product vs fc1 and GELU outputs), less the 4h·(1 − H_kv/H) that GQA
    saves on k and v and the 2h of dropout masks Llama does not have. The meter measures the package's
    dense ``LlamaBlock`` (flash attention: the "selective" row) at exactly this row plus what it leaves
    out: per unfused RMSNorm x·rsqrt (2·s'bh) and rsqrt (2·s'b), RoPE's fp32 cos and sin tables (4 ·
    4·s'·head_dim) and the kernel's fp32 log-sum-exp (4·b·H·s') (tests/test_memory_budget.py).

    The score term is this rank's s' queries against all s keys for a/t heads (Ulysses holds a/(t·cp)
    heads against s queries: the same bytes). Flash-style kernels, and ``ring_attention``, keep none
    of it: "selective" is their row. Norm statistics (a few bytes per token) are left out, as the
    paper does.

    Context parallelism adds what its ``attention`` kind keeps beyond its own q, k, v, out and lse
    (``AttentionKind.extra_saved_bytes``; ``ulysses``: u for a kind with both groups): for Llama 3's
    "allgather" the gathered K/V of the other cp − 1 ranks, 2(cp − 1)·s'·b·k/t' bytes in 16 bits (t' = t
    while the K/V heads split over t, else each rank holds one); nothing under full recompute.
    """
    m = as_model(model)
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    if seq % cp or (seq // cp) % tp:
        raise ValueError(f"seq={seq} must split into cp={cp} pieces of a multiple of tp={tp} tokens")
    s_local, b, h, f, a = seq // cp, micro_batch, m.d_model, m.d_ff, m.n_heads
    if recompute == "full":
        return 2 * s_local * b * h / tp
    q, kv = m.q_dim, m.n_kv_heads * m.head_dim
    if m.mlp == "gelu":
        per_token, score_bytes = 10 * h + 8 * q + 4 * f, 5
    else:
        per_token, score_bytes = 8 * h + 4 * q + 4 * kv + 8 * f, 2
    kind = attention_kind(attention)
    shape = LocalShape(b, a // tp, max(m.n_kv_heads // tp, 1), s_local, m.head_dim, elem=2)
    kept = s_local * b * per_token / tp + kind.extra_saved_bytes(shape, *kind.sizes(cp, ulysses))
    return kept if recompute == "selective" else kept + score_bytes * a * s_local * seq * b / tp


GIB = 2**30
# What a training process holds beyond its tensors: the CUDA context (~0.3 GiB with lazy module loading since
# CUDA 11.7, over 1 GiB before: https://github.com/pytorch/pytorch/issues/107667), NCCL's communicator
# buffers (a few MiB per channel and peer, for each of the tp, cp and dp communicators) and cuBLAS
# workspaces. An allowance, not a measurement; allocator fragmentation comes on top and is not modelled.
RESERVE_BYTES = 2 * GIB
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Budget:
    """Bytes per GPU: 16-bit ``weights``, fp32 ``master_weights``, ``gradients``, ``optimizer`` state (Adam's
    two moments), ``activations`` (every layer, the embedding, the output layer and loss; of which
    ``output_activations`` are the embedding's and the output layer's, for one micro-batch of what the
    reported pipeline rank holds of them), and a ``reserve`` for the CUDA context and NCCL."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_per_layer: float
    parameters: float  # held by this GPU (before ZeRO sharding)
    master_weights: float = 0.0
    output_activations: float = 0.0
    reserve: float = 0.0
    stage: int = 0  # the pipeline rank reported: the one that needs the most memory (0 without pipeline)
    layers: int = 0  # transformer layers on that rank (all of them without pipeline)
    in_flight: float = 1.0  # micro-batches whose activations that rank keeps at its peak, in whole stages

    @property
    def states(self) -> float:
        """Weights, master weights, gradients and optimizer state: Megatron's "weight and optimizer memory"."""
        return self.weights + self.master_weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.states + self.activations + self.reserve


def output_activations(model: Model | str, seq: int, micro_batch: int, cp: int = 1, tp: int = 1) -> float:
    """Activation bytes of the embedding, the output layer and the loss on one GPU (Megatron's
    ``compute_activation_memory``, with s' = seq/cp tokens):

        embedding: 8·s'·b (the token ids, int64) + s'·b·h (its dropout mask; GPT only, Llama has none)
        output layer and loss: 4·s'·b·h·(1 + V/h) = 4·s'·b·h + 4·s'·b·V (the final norm's input and output
            in 16 bits, and the logits in fp32 for the cross-entropy)

    all divided by t, as Megatron does (sequence and vocabulary parallelism). For Llama 3 (V = 128,256,
    h = 4,096) the output layer keeps 129·s·b·h bytes: more than all 32 layers keep under full recompute (64·s·b·h).
    """
    m = as_model(model)
    s, b, h = seq // cp, micro_batch, m.d_model
    embedding = 8 * s * b + (s * b * h if m.mlp == "gelu" else 0)
    return (embedding + 4 * s * b * h * (1 + m.vocab / h)) / tp


def stage_layers(n_layers: int, stages: int, balance: str = "even") -> list[int]:
    """Transformer layers of each of ``stages`` pipeline stages (pp · virtual_stages, in stage order).

    ``"even"``: n_layers / stages each; ``"ends"``: the first and last stage one layer fewer, as Llama 3 split
    126 layers into 16 stages (the paper, §3.3.2: those stages also hold the embedding and the output layer),
    (n_layers + 2) / stages each. ValueError naming the numbers when they do not divide.
    """
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"pipeline stages must be a positive int, got {stages!r}")
    if stages == 1:
        return [n_layers]
    if balance == "even":
        if n_layers % stages:
            raise ValueError(f"n_layers={n_layers} does not split into {stages} pipeline stages (pp · virtual_stages); "
                             f"pass layers_per_stage, e.g. balance='ends' when (n_layers + 2) divides")
        return [n_layers // stages] * stages
    if balance == "ends":
        if (n_layers + 2) % stages or (n_layers + 2) // stages < 2:
            raise ValueError(f"n_layers={n_layers} + 2 does not split into {stages} stages of >= 2 layers "
                             f"(balance='ends': the first and last stage one layer fewer)")
        k = (n_layers + 2) // stages
        return [k - 1] + [k] * (stages - 2) + [k - 1]
    raise ValueError(f"balance must be 'even' or 'ends', got {balance!r}")


@lru_cache(maxsize=4096)
def _kept_counts(schedule: str, p: int, m: int, v: int, rank: int) -> tuple[tuple[int, ...], ...]:
    """The micro-batches of each chunk ``rank`` keeps right after each of its forwards (where its peaks are),
    without the vectors another one dominates: walking its program, micro-batch k of chunk c is kept from
    its F to its B (to its W when the program splits the backward: W needs the layer inputs)."""
    actions = _program(schedule, p, m, v)[rank]
    split = {(a.microbatch, a.chunk) for a in actions if a.kind == "W"}
    counts, seen = [0] * v, set()
    for a in actions:
        if a.kind == "F":
            counts[a.chunk] += 1
            seen.add(tuple(counts))
        elif a.kind == ("W" if (a.microbatch, a.chunk) in split else "B"):
            counts[a.chunk] -= 1
    if v == 1:
        return (max(seen),)
    return tuple(c for c in seen if not any(d != c and all(x >= y for x, y in zip(d, c)) for d in seen))


@lru_cache(maxsize=64)
def _program(schedule: str, p: int, m: int, v: int) -> dict:
    return schedule_class(schedule).make_program(p, m, v)


def peak_in_flight(schedule: str, p: int, m: int, v: int, rank: int, chunk_bytes: Sequence[float]) -> float:
    """Rank ``rank``'s peak of activation bytes kept, walking its program of ``schedule`` in order: micro-batch k
    of chunk c adds ``chunk_bytes[c]`` at its F and frees it at its B (at its W when the program splits the
    backward). Stage 0 with equal chunks: ``in_flight(schedule, p, m, v)`` × its bytes
    (tests/test_memory_pipeline.py checks it)."""
    return max(sum(n * b for n, b in zip(counts, chunk_bytes)) for counts in _kept_counts(schedule, p, m, v, rank))


def budget(model: Model | str, mesh_shape: tuple[int, int, int], seq: int, micro_batch: int, *,
           dtype: str = "bf16", grad_dtype: str = "fp32", optimizer: str = "adam", recompute: str = "none",
           zero: int = 1, reserve: float = RESERVE_BYTES, attention: str = "ring", ulysses: int = 1,
           pp: int = 1, virtual_stages: int = 1, schedule: str = "1f1b", n_microbatches: int | None = None,
           layers_per_stage: Sequence[int] | None = None) -> Budget:
    """The memory of one GPU training ``model`` on a (dp, cp, tp) mesh, in bytes, as Megatron-LM counts it
    (``megatron/training/theoretical_memory_usage.py``).

    Per parameter held (``Model.parameters(tp)``): weights in ``dtype``; gradients in ``grad_dtype``
    (default fp32: Megatron accumulates and reduces "main gradients" in fp32 with bf16 weights; "bf16"
    selectable); ``optimizer="adam"``: fp32 master weights (none when ``dtype="fp32"``: the weights are
    their own master) and two fp32 moments, ``"none"``: nothing. bf16 weights, fp32 gradients, Adam:
    2 + 4 + 4 + 8 = 18 bytes, Megatron's 18. ``zero`` shards them over the dp·cp replicas (Megatron's
    distributed optimizer shards over DP×CP): 1 the master weights and moments (``--use-distributed-optimizer``:
    6 + 12/(dp·cp) bytes, the default here and in ``ts.plan``), 2 also the gradients, 3 (FSDP) also the
    weights; 0 nothing. Activations: ``layer_activations`` times the layers (``attention`` and ``ulysses``
    the context-parallel kind's) plus ``output_activations``. ``reserve``: bytes for the CUDA context
    and NCCL (``RESERVE_BYTES``, 2 GiB, an allowance). Not counted: temporary buffers and allocator
    fragmentation.

    Pipeline parallelism (``pp`` > 1; names as Megatron's and ``torch.distributed.pipelining``'s): the
    layers split into pp · ``virtual_stages`` stages (``layers_per_stage``, or evenly: ``stage_layers``;
    rank r holds stages r, r + pp, ...). With A the activations of one layer and micro-batch, E the
    embedding's (``output_activations``' embedding part) and O the output layer's and loss's, rank r keeps
    at its peak

        first rank:  in_flight(schedule, pp, m, v) · (L₀·A + E)     1F1B: min(pp, m); GPipe: m;
                                                                     interleaved: pp·(1 + (pp−1)/(pp·v))
        last rank:   1F1B: 1 · (L·A + O) (its forward is followed by its backward); GPipe: m · (L·A + O)

    and every rank its walk of the schedule's program (``peak_in_flight``; m = ``n_microbatches``, default
    pp: Megatron's assumption that m >= pp). Parameters: the rank's layers, plus the embedding (V·h/t) on
    the first rank and the output layer and final norm on the last (a tied embedding is copied there, as
    Megatron does). The reported rank is the one with the largest total (``Budget.stage``).

    Against Megatron's formula (tests/test_memory_pipeline.py pins both): Megatron reports the first stage,
    counts (L/pp)·layer + V·h parameters there and divides the final norm over the stages (here it is on the
    last: h parameters); its activations are L·A·min(1, m/pp) (or × the interleaved penalty) plus
    pp · (8sb + sbh) for the embedding, the same as in_flight · (L/pp · A + E) here; for Llama it
    charges A as GPT's (18h + 4f)·sb/t and a dropout mask after the embedding, which Llama has not
    (``layer_activations``, ``output_activations``).
    """
    m = as_model(model)
    if len(mesh_shape) != 3 or any(int(n) != n or n < 1 for n in mesh_shape):
        raise ValueError(f"mesh_shape must be (dp, cp, tp) of positive integers, got {mesh_shape}")
    for name, value in (("dtype", dtype), ("grad_dtype", grad_dtype)):
        if value not in DTYPE_BYTES:
            raise ValueError(f"{name} must be one of {sorted(DTYPE_BYTES)}, got {value!r}")
    if optimizer not in ("adam", "none"):
        raise ValueError(f"optimizer must be 'adam' or 'none', got {optimizer!r}")
    if zero not in ZERO_STAGES:
        raise ValueError(f"zero must be one of {ZERO_STAGES}, got {zero!r}")
    if not reserve >= 0:
        raise ValueError(f"reserve must be >= 0 bytes, got {reserve}")
    for name, value in (("pp", pp), ("virtual_stages", virtual_stages)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    dp, cp, tp = mesh_shape
    if m.n_heads % tp:
        raise ValueError(f"n_heads={m.n_heads} of {m.name} is not divisible by tp={tp}")
    e = DTYPE_BYTES[dtype]
    master = 0 if optimizer == "none" or e == 4 else 4
    moments = 0 if optimizer == "none" else 8
    replicas = dp * cp
    shard = {stage: (replicas if zero >= stage else 1) for stage in (1, 2, 3)}
    per_layer = layer_activations(m, seq, micro_batch, cp, tp, recompute, attention, ulysses)
    output = output_activations(m, seq, micro_batch, cp, tp)
    if pp == 1 and virtual_stages == 1 and layers_per_stage is None:  # no pipeline: one micro-batch at a time
        params, activations, stage, layers, kept = m.parameters(tp), m.n_layers * per_layer + output, 0, m.n_layers, 1.0
    else:
        embedding = _embedding_activations(m, seq, micro_batch, cp, tp)
        params, activations, stage, layers, kept = _worst_stage(
            m, tp, pp, virtual_stages, schedule, n_microbatches, layers_per_stage, per_layer, output, embedding,
            lambda p, a: p * (e / shard[3] + (master + moments) / shard[1] + DTYPE_BYTES[grad_dtype] / shard[2]) + a)
        output = (embedding if stage == 0 else 0.0) + (output - embedding if stage == pp - 1 else 0.0)  # one micro-batch's
    return Budget(weights=params * e / shard[3], gradients=params * DTYPE_BYTES[grad_dtype] / shard[2],
                  optimizer=params * moments / shard[1], activations=activations,
                  activations_per_layer=per_layer, parameters=params, master_weights=params * master / shard[1],
                  output_activations=output, reserve=reserve, stage=stage, layers=layers, in_flight=kept)


def _embedding_activations(m: Model, seq: int, micro_batch: int, cp: int, tp: int) -> float:
    """The embedding's share of ``output_activations``: the token ids (8·s'·b) and GPT's dropout mask (s'·b·h), / t."""
    s, b = seq // cp, micro_batch
    return (8 * s * b + (s * b * m.d_model if m.mlp == "gelu" else 0)) / tp


def _worst_stage(m: Model, tp: int, pp: int, v: int, schedule: str, n_microbatches: int | None,
                 layers_per_stage: Sequence[int] | None, per_layer: float, output: float, embedding: float,
                 size) -> tuple[float, float, int, int, float]:
    """(parameters, activation bytes, rank, layers, micro-batches in flight) of the pipeline rank whose
    ``size(parameters, activations)`` is largest (the first such rank on a tie)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {tuple(SCHEDULES)}, got {schedule!r}")
    stages = pp * v
    layers = list(layers_per_stage) if layers_per_stage is not None else stage_layers(m.n_layers, stages)
    if len(layers) != stages or sum(layers) != m.n_layers or min(layers) < 1:
        raise ValueError(f"layers_per_stage={layers} must be {stages} counts >= 1 (pp={pp} x virtual_stages={v}) "
                         f"adding up to n_layers={m.n_layers}")
    if n_microbatches is None and schedule == "gpipe":
        raise ValueError("schedule='gpipe' keeps every micro-batch in flight: pass n_microbatches")
    mb = pp if n_microbatches is None else n_microbatches
    in_flight(schedule, pp, mb, v)  # checks the schedule's p, m, v (interleaved: m >= p, v > 1 only there)
    head = output - embedding  # the final norm's input and output and the fp32 logits
    embedding_table = m.vocab * m.d_model / tp
    last = m.other_parameters(tp) - (0 if m.tied_embeddings else embedding_table)  # output layer, final norm
    best = None
    for r in range(pp):
        owned = [r + c * pp for c in range(v)]
        chunk = [layers[s] * per_layer + (embedding if s == 0 else 0.0) + (head if s == stages - 1 else 0.0)
                 for s in owned]
        ends = m.other_parameters(tp) if pp == 1 else (embedding_table if r == 0 else 0) + (last if r == pp - 1 else 0)
        n = sum(layers[s] for s in owned)
        params = n * m.layer_parameters(tp) + ends
        kept = peak_in_flight(schedule, pp, mb, v, r, chunk)
        candidate = (size(params, kept), params, kept, r, n, kept / sum(chunk))
        if best is None or candidate[0] > best[0]:
            best = candidate
    _, params, kept, r, n, flight = best
    return params, kept, r, n, flight
