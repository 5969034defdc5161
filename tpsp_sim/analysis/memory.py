"""Activation memory per rank: what autograd saves for backward, measured and predicted.

``saved_tensor_meter()`` counts the bytes of the distinct storages saved for backward while it is
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

``budget(model, (dp, cp, tp), seq, micro_batch, recompute=...)`` is the whole memory of one GPU:
weights, gradients and optimizer state (mixed-precision Adam: 2 + 2 + 12 = 16 bytes per parameter,
ZeRO paper §3.1, before any sharding; all three divided by tp, and with ``distributed_optimizer=True``
the optimizer's 12 also by dp·cp) and the activations of every layer (see ``layer_activations``).
``budget`` defaults to ``distributed_optimizer=False`` (the plain count); ``ts.plan`` passes True,
as Megatron-LM runs long-context training.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable

import torch

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
                      recompute: str = "none") -> float:
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
    2h (= 34h at f = 4h); z = 5: the softmax output, its dropout mask and the dropped probabilities.
    This row is checked against ``saved_tensor_meter`` within 1% (tests/test_memory_budget.py).

    Llama block (``mlp="swiglu"``, no dropout), the same accounting (a derivation: the package's own
    ``LlamaBlock`` is unfused and keeps more, so the meter cannot check it): K = 12h + 4h·H_kv/H + 8f
    — RMSNorm inputs 4h, qkv input 2h, q 2h, k and v 4h·H_kv/H (grouped-query attention keeps the
    H_kv heads), o input 2h, MLP input 2h, gate and up outputs 4f, silu(gate) 2f and the product
    2f (SwiGLU keeps twice GELU's 4f); z = 2: the softmax output only.

    The score term is this rank's s' queries against all s keys for a/t heads (Ulysses holds a/(t·cp)
    heads against s queries: the same bytes). Flash-style kernels, and ``ring_attention``, keep none
    of it: "selective" is their row. Norm statistics (a few bytes per token) are left out, as the
    paper does.
    """
    m = as_model(model)
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    if seq % cp or (seq // cp) % tp:
        raise ValueError(f"seq={seq} must split into cp={cp} pieces of a multiple of tp={tp} tokens")
    s_local, b, h, f, a = seq // cp, micro_batch, m.d_model, m.d_ff, m.n_heads
    if recompute == "full":
        return 2 * s_local * b * h / tp
    if m.mlp == "gelu":
        per_token, score_bytes = 18 * h + 4 * f, 5
    else:
        per_token, score_bytes = 12 * h + 4 * h * m.n_kv_heads / m.n_heads + 8 * f, 2
    kept = s_local * b * per_token / tp
    return kept if recompute == "selective" else kept + score_bytes * a * s_local * seq * b / tp


@dataclass(frozen=True)
class Budget:
    """Bytes per GPU: ``weights``, ``gradients``, ``optimizer`` state and ``activations`` (all layers)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_per_layer: float
    parameters: float  # held by this GPU

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def budget(model: Model | str, mesh_shape: tuple[int, int, int], seq: int, micro_batch: int, *,
           dtype: str = "bf16", optimizer: str = "adam", recompute: str = "none",
           distributed_optimizer: bool = False) -> Budget:
    """The memory of one GPU training ``model`` on a (dp, cp, tp) mesh, in bytes.

    Weights and gradients in ``dtype``; ``optimizer="adam"`` keeps fp32 master weights, momentum and
    variance (12 bytes per parameter; 8 when ``dtype="fp32"``, whose weights are their own master),
    ``"none"`` nothing. So mixed-precision Adam holds 16 bytes per parameter, divided by tp (the
    parameters a GPU holds, ``Model.parameters(tp)``). ``distributed_optimizer=True`` also splits the
    optimizer state over the dp·cp replicas (ZeRO stage 1; Megatron's ``--use-distributed-optimizer``,
    whose group is DP×CP); weights and gradients stay whole on every replica (default False; ``ts.plan``'s
    default is True). Activations: ``layer_activations`` times the number of layers (no pipeline
    parallelism: every layer is on every GPU). Not counted: the embedding and output
    layer's activations (the logits), temporary buffers, the allocator's fragmentation, CUDA context.
    """
    m = as_model(model)
    if len(mesh_shape) != 3 or any(int(n) != n or n < 1 for n in mesh_shape):
        raise ValueError(f"mesh_shape must be (dp, cp, tp) of positive integers, got {mesh_shape}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if optimizer not in ("adam", "none"):
        raise ValueError(f"optimizer must be 'adam' or 'none', got {optimizer!r}")
    dp, cp, tp = mesh_shape
    if m.n_heads % tp:
        raise ValueError(f"n_heads={m.n_heads} of {m.name} is not divisible by tp={tp}")
    e = DTYPE_BYTES[dtype]
    params = m.parameters(tp)
    state = 0 if optimizer == "none" else (8 if e == 4 else 12)
    per_layer = layer_activations(m, seq, micro_batch, cp, tp, recompute)
    shards = dp * cp if distributed_optimizer else 1
    return Budget(weights=params * e, gradients=params * e, optimizer=params * state / shards,
                  activations=m.n_layers * per_layer, activations_per_layer=per_layer, parameters=params)


class saved_tensor_meter:
    """Context manager: ``.nbytes`` is the bytes of distinct storages saved for backward while open.

    A storage saved twice (q and k as views of one qkv output, say) counts once; storages of the
    tensors in ``exclude`` (e.g. ``model.parameters()``) do not count. Meters nest (torch applies
    only the innermost saved-tensor hooks, so the innermost meter counts for every open one). Per
    thread: on virtual ranks, open it inside the rank's function.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {_key(t) for t in exclude}
        self._storages: dict[tuple, torch.UntypedStorage] = {}
        self.nbytes = 0

    def _count(self, t: torch.Tensor) -> None:
        key = _key(t)
        if key not in self._excluded and key not in self._storages:
            self._storages[key] = t.untyped_storage()  # kept alive while open, so its address is not reused
            self.nbytes += t.untyped_storage().nbytes()

    @staticmethod
    def _pack(t: torch.Tensor) -> torch.Tensor:
        for meter in _open.meters:
            meter._count(t)
        return t

    def __enter__(self) -> "saved_tensor_meter":
        if not hasattr(_open, "meters"):
            _open.meters = []
        _open.meters.append(self)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        _open.meters.remove(self)
        self._storages.clear()


_open = threading.local()  # the meters open on this thread


def _key(t: torch.Tensor) -> tuple:
    return t.device, t.untyped_storage().data_ptr()
