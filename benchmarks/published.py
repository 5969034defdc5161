"""Published measurements next to what this package predicts for the same case, each with its source and
the tolerance it is held to (``tests/test_published.py`` checks every row; notebook 08 shows them).

    python benchmarks/published.py        # prints the table

Bus bandwidth is nccl-tests' "busbw" (bytes one rank sends in a ring collective / time); the package's
number is that ratio for ``ts.cost.collective_time`` of a 1 GiB message, latency included. Megatron's
memory rows hold ``ts.memory.budget`` against Megatron-LM's own formula (``megatron_memory`` below, its
``theoretical_memory_usage.py`` written out), fed the same mesh: its ``data_parallel_size`` is our dp·cp
(Megatron's distributed optimizer shards over DP×CP) and its ``seq_length`` our s / cp (the formula does
not know context parallelism). Where the two count the same tensors (weights and optimizer; the
activations of a GPT-shaped layer) the target is 5%; where they do not (Llama's SwiGLU and GQA layer,
which Megatron charges as GPT's 18h + 4f) the row says so and pins the difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import tpsp_sim as ts
from tpsp_sim.analysis.models import MODELS, Model

GB, GIB = 1e9, 2**30
NCCL_TESTS_212 = "https://github.com/NVIDIA/nccl-tests/issues/212"
NCCL_TESTS_119 = "https://github.com/NVIDIA/nccl-tests/issues/119"
NCCL_TESTS_149 = "https://github.com/NVIDIA/nccl-tests/issues/149"
NCCL_TESTS_22 = "https://github.com/NVIDIA/nccl-tests/issues/22"
MEGATRON = "https://github.com/NVIDIA/Megatron-LM/blob/main/megatron/training/theoretical_memory_usage.py"
KORTHIKANTI = "https://arxiv.org/abs/2205.05198"
LIU = "https://arxiv.org/abs/2310.01889"
FLASH3 = "https://arxiv.org/abs/2407.08608"
FLASH2 = "https://arxiv.org/abs/2307.08691"


@dataclass(frozen=True)
class Row:
    """One published number, this package's number for the same case, and how far apart they may be."""

    what: str
    source: str
    published: float
    unit: str
    tolerance: float  # relative: |predicted / published - 1| <= tolerance
    predict: Callable[[], float]
    note: str = ""  # where the model is off, and why

    @property
    def predicted(self) -> float:
        return self.predict()

    @property
    def error(self) -> float:
        return self.predicted / self.published - 1

    @property
    def holds(self) -> bool:
        return abs(self.error) <= self.tolerance


def busbw(op: str, cluster: ts.cost.Cluster | str, ranks: list[int], nbytes: int = GIB) -> float:
    """nccl-tests' bus bandwidth of ``op`` on ``ranks`` of ``cluster`` as this package prices it: the bytes
    one rank sends (``wire_bytes``) over ``collective_time``; ``nbytes`` is the op's full buffer (all_gather:
    the output, as nccl-tests sizes it)."""
    p = len(ranks)
    given = nbytes // p if op == "all_gather" else nbytes
    sent, received = ts.core.ops.wire_bytes(op, given, p)
    return max(sent, received) / ts.cost.collective_time(op, given, p, cluster, ranks=ranks)


# Three nodes of 8 A100 SXM4 40 GB, 4 HDR ports per node (nccl-tests#119): each GPU's share is half a port.
A100_3_NODES_4_HDR = ts.cost.Cluster(
    "3 x 8 A100 40GB, 4 HDR per node", ts.cost.CLUSTERS["dgx-a100"].peak_flops, 8,
    ts.cost.CLUSTERS["dgx-a100"].intra_node,
    ts.cost.Link("HDR, one port per 2 GPUs", 12.5 * GB, 5e-6, achieved=12.0 * GB, source=NCCL_TESTS_119),
    40 * GIB, NCCL_TESTS_119)


# Two AWS p3dn.24xlarge (nccl-tests#22): 8 V100 SXM2 (NVLink 2, 150 GB/s each way) and one 100 Gb/s EFA per node.
P3DN_2_NODES = ts.cost.Cluster(
    "2 x p3dn.24xlarge", 125e12, 8, ts.cost.Link("NVLink 2", 150 * GB, 2e-6),
    ts.cost.Link("EFA 100 Gb/s, one per 8 GPUs", 12.5 * GB / 8, 5e-6), 32 * GIB, NCCL_TESTS_22)


def ring_over_tree(cluster: ts.cost.Cluster, ranks: list[int], nbytes: int) -> float:
    """How many times longer an all_reduce of ``nbytes`` takes as a ring than as NCCL's tree
    (``ts.cost.all_reduce_times``)."""
    times = ts.cost.all_reduce_times(nbytes, len(ranks), cluster, ranks=ranks)
    return times["ring"] / times["tree"]


def megatron_memory(m: Model, tp: int, data_parallel: int, seq: int, micro_batch: int = 1,
                    distributed_optimizer: bool = True) -> tuple[float, float]:
    """(weight and optimizer bytes, activation bytes) of the most loaded GPU by Megatron-LM's formula
    (``theoretical_memory_usage.py``, no pipeline, sequence parallelism with selective recompute):

    parameters P = L·(2h·(f·g + n) + 2h²·(1 + H_kv/H)) + (1 or 2)·V·h + n·h (g = 3/2 for SwiGLU, n = 1 norm
    for RMSNorm, 2 for LayerNorm; its query projection is h wide), on the most loaded shard
    (P_layers + embedding [+ output when untied]) / t, times 18 bytes (6 + 12/d with the distributed
    optimizer); activations (s·b·h·(18 + 4f/h)·L + 8sb + sbh + 4sbh·(1 + V/h)) / t.
    """
    h, f, n = m.d_model, m.d_ff, (1 if m.mlp == "swiglu" else 2)
    gated = 1.5 if m.mlp == "swiglu" else 1.0
    layer = 2 * h * (f * gated + n) + 2 * h * h * (1 + m.n_kv_heads / m.n_heads)
    block = m.n_layers * layer + n * h
    embedding = m.vocab * h
    shard = (block + embedding + (0 if m.tied_embeddings else embedding)) / tp
    per_parameter = 6 + 12 / data_parallel if distributed_optimizer else 18
    s, b = seq, micro_batch
    activations = (s * b * h * (18 + 4 * f / h) * m.n_layers + 8 * s * b + s * b * h
                   + 4 * s * b * h * (1 + m.vocab / h)) / tp
    return shard * per_parameter, activations


def _states(model: str, dp: int, cp: int, tp: int) -> Callable[[], float]:
    return lambda: ts.memory.budget(model, (dp, cp, tp), 8192 * cp, 1, recompute="selective").states


def _activations(m: Model | str, dp: int, cp: int, tp: int, seq: int) -> Callable[[], float]:
    return lambda: ts.memory.budget(m, (dp, cp, tp), seq, 1, recompute="selective").activations


def attention_tflops(cluster: str, kernel: str, direction: int) -> float:
    """TFLOP/s at which ``ts.plan(attention_efficiency=kernel)`` runs Llama 3 8B's causal attention core (head dim
    128) at 16K tokens on one GPU of ``cluster``: its FLOPs over the seconds ``attention_core_time`` charges,
    forward (``direction`` 0) or backward (1)."""
    m, c = MODELS["llama3-8b"], ts.cost.CLUSTERS[cluster]
    flops = ts.analysis.layer.causal_attention_flops(m, 16384, 1, 1)[direction]
    return flops / ts.analysis.planner.attention_core_time(m, c, 16384, 1, 1, 1, kernel)[direction] / 1e12


GPT_8K = Model("GPT, h 4096, f 4h", 32, 4096, 32, 32, 4 * 4096, 51200, mlp="gelu")

ROWS: list[Row] = [
    # ---- collectives: nccl-tests bus bandwidth, target 20% ----
    Row("8 x H100 SXM (one DGX H100), ring all_gather busbw", NCCL_TESTS_212, 370, "GB/s", 0.2,
        lambda: busbw("all_gather", "dgx-h100", list(range(8))) / GB,
        "NCCL maintainer: 450 GB/s line rate less ~20% protocol overhead; the model's achieved figure is this number"),
    Row("8 x H100 SXM, all_reduce busbw with NVLink SHARP (NCCL's default)", NCCL_TESTS_212, 480, "GB/s", 0.2,
        lambda: busbw("all_reduce", "dgx-h100", list(range(8))) / GB, "the link's nvls figure is this number"),
    Row("3 nodes x 8 A100 40GB, 4 HDR per node, all_reduce busbw (peak)", NCCL_TESTS_119, 96, "GB/s", 0.2,
        lambda: busbw("all_reduce", A100_3_NODES_4_HDR, list(range(24))) / GB,
        "one ring per NIC: 8 GPUs' half ports = 4 x 25 GB/s per node; HDR's 96% achieved is calibrated on this row, "
        "the sum over the NICs is the model's (one NIC would give 12 GB/s)"),
    Row("8 x A100 SXM4 80GB (HPE Apollo 6500), all_reduce busbw", NCCL_TESTS_149, 200, "GB/s", 0.2,
        lambda: busbw("all_reduce", "dgx-a100", list(range(8))) / GB,
        "the model's 230 GB/s comes from a DGX-class measurement (230-250); this machine measures ~13% less"),
    Row("2 nodes x 8 V100 (p3dn), one 100 Gb/s NIC per node: 1 GB all_reduce, ring time / tree time",
        NCCL_TESTS_22, 268 / 134, "x", 0.2, lambda: ring_over_tree(P3DN_2_NODES, list(range(16)), 10**9),
        "the tree sends N across the NIC, the ring 2·15/16·N; the model also charges the tree NCCL's 0.92, so 1.73"),
    # ---- memory: Megatron's formula, target 5% where both count the same tensors ----
    *[Row(f"Llama 3 {size} weights + optimizer, tp={tp}, dp·cp={dp * cp}", MEGATRON,
          megatron_memory(MODELS[f"llama3-{size.lower()}"], tp, dp * cp, 8192)[0] / GIB, "GiB", 0.05,
          (lambda f: lambda: f() / GIB)(_states(f"llama3-{size.lower()}", dp, cp, tp)),
          "same tensors; Megatron splits the norms over t too (a few MB)")
      for size, tp, dp, cp in (("8B", 1, 8, 2), ("8B", 8, 1, 2), ("70B", 8, 4, 2), ("70B", 8, 1, 16))],
    *[Row(f"GPT-shaped 7B (h 4096, f 4h) activations, tp={tp}, cp={cp}, seq {seq // 1024}K", MEGATRON,
          megatron_memory(GPT_8K, tp, dp * cp, seq // cp)[1] / GIB, "GiB", 0.05,
          (lambda f: lambda: f() / GIB)(_activations(GPT_8K, dp, cp, tp, seq)),
          "same tensors (Korthikanti's 34sbh per layer, embedding, logits)")
      for tp, dp, cp, seq in ((1, 8, 1, 8192), (8, 1, 2, 32768), (4, 2, 4, 131072))],
    *[Row(f"Llama 3 {size} activations, tp={tp}, cp={cp}, seq {seq // 1024}K", MEGATRON,
          megatron_memory(MODELS[f"llama3-{size.lower()}"], tp, dp * cp, seq // cp)[1] / GIB, "GiB", 0.3,
          (lambda f: lambda: f() / GIB)(_activations(f"llama3-{size.lower()}", dp, cp, tp, seq)),
          "not the same tensors: Megatron charges GPT's 18h + 4f per token and layer, the package counts Llama's "
          "12h + 4h·H_kv/H + 8f (SwiGLU keeps 8f, GQA's k and v are smaller, no dropout masks): +28% per layer "
          "for 8B, less with the logits, which both count alike")
      for size, tp, dp, cp, seq in (("8B", 1, 8, 2, 16384), ("8B", 8, 1, 4, 131072), ("70B", 8, 1, 16, 131072))],
    # ---- activations per layer: Korthikanti et al. 2022, Table 2 (formulas; the meter checks them too) ----
    Row("Korthikanti Table 2, TP+SP, no recompute: sbh/t (34 + 5as/h), GPT-3 175B layer, s 2048, t 8",
        KORTHIKANTI, 2048 * 12288 / 8 * (34 + 5 * 96 * 2048 / 12288) / GIB, "GiB", 1e-12,
        lambda: ts.memory.layer_activations(Model("GPT-3", 1, 12288, 96, 96, 4 * 12288, 1, mlp="gelu"), 2048, 1,
                                            tp=8) / GIB,
        "exact; tests/test_memory_budget.py holds it against the saved-tensor meter within 1%"),
    Row("Korthikanti Table 2, TP+SP + selective recompute: 34 sbh/t, GPT-3 175B layer, s 2048, t 8",
        KORTHIKANTI, 34 * 2048 * 12288 / 8 / GIB, "GiB", 1e-12,
        lambda: ts.memory.layer_activations(Model("GPT-3", 1, 12288, 96, 96, 4 * 12288, 1, mlp="gelu"), 2048, 1,
                                            tp=8, recompute="selective") / GIB, "exact"),
    # ---- ring attention's overlap block: Liu et al. 2023 ----
    Row("Liu et al., minimal block hiding the ring, A100 NVLink", LIU, 1.0e3, "tokens", 0.1,
        lambda: ts.cost.ring_overlap_block("a100-nvlink"), "F/B = 312e12 / 300e9 = 1040 at datasheet bandwidth"),
    Row("Liu et al., minimal block hiding the ring, A100 InfiniBand 100 Gb/s", LIU, 24.5e3, "tokens", 0.03,
        lambda: ts.cost.ring_overlap_block("a100-ib"), "F/B = 312e12 / 12.5e9 = 24,960"),
    # ---- compute: FlashAttention-3 on H100 against the planner's single MFU ----
    Row("FlashAttention-3 forward, BF16, H100 SXM (peak of the paper's sweeps)", FLASH3, 740, "TFLOP/s", 0.35,
        lambda: 0.5 * ts.cost.CLUSTERS["dgx-h100"].peak_flops / 1e12,
        "off by a third: the planner runs all compute at one MFU (0.5 of peak); attention kernels reach 75% "
        "at long sequences, so long-context steps are priced slower than FA3 runs them (plan.IGNORES) unless "
        "attention_efficiency prices them at the rows below"),
    # ---- compute: the attention core at a published kernel's speed, plan(attention_efficiency=...) ----
    Row("FlashAttention-3 forward, causal, BF16, head dim 128, 16K tokens, H100 SXM5", FLASH3, 616, "TFLOP/s", 0.01,
        lambda: attention_tflops("dgx-h100", "fa3-h100-bf16", 0),
        "read from the paper's bar label; the planner charges the causal half of the FLOPs at this speed"),
    Row("FlashAttention-3 backward, BF16, head dim 128, 16K tokens, H100 SXM5 (the paper: without causal mask)",
        FLASH3, 561, "TFLOP/s", 0.01, lambda: attention_tflops("dgx-h100", "fa3-h100-bf16", 1),
        "the paper reports no causal backward; the planner takes the non-causal speed for the causal backward"),
    Row("FlashAttention-3 forward, FP8, head dim 256, 16K tokens, H100 SXM5 (without causal mask)", FLASH3, 1171,
        "TFLOP/s", 0.01, lambda: attention_tflops("dgx-h100", "fa3-h100-fp8", 0),
        "the abstract's 'close to 1.2 PFLOPs/s'; head dim 256 and no mask, so an upper bound for Llama's head dim 128"),
    Row("FlashAttention-2 forward, A100 SXM4: up to 73% of the theoretical maximum", FLASH2, 0.73 * 312, "TFLOP/s",
        0.01, lambda: attention_tflops("dgx-a100", "fa2-a100-bf16", 0),
        "the abstract's best case (the paper's range is 50-73%); its backward is taken at this speed"),
]


def table() -> str:
    """The rows as Markdown: published, predicted, error, tolerance, source."""
    lines = ["| case | published | predicted | error | tolerance | source |", "|---|---:|---:|---:|---:|---|"]
    for r in ROWS:
        lines.append(f"| {r.what} | {r.published:,.4g} {r.unit} | {r.predicted:,.4g} {r.unit} | {r.error:+.1%} | "
                     f"{r.tolerance:.0%} | {r.source} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
