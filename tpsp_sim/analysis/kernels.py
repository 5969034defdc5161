"""Attention kernels at their published speed: the causal attention core's share of a GPU's peak, forward and
backward apart, per GPU and dtype (``ts.plan(attention_efficiency=...)``).

The planner runs the GEMMs (projections, MLP) at ``mfu`` of the cluster's peak; the attention core
(Q Kᵀ, softmax, P V and their backward: ``causal_attention_flops``) can run at a kernel's own speed,
taken from the paper that measured it. A share is of the GPU's dense 16-bit peak (``Cluster.peak_flops``),
so an FP8 kernel may exceed 1 (the FP8 peak is twice the 16-bit one). The numbers are the papers' own
figures at 16K tokens (their longest), read from the bar labels:

* FlashAttention-3 on H100 SXM5 (Shah et al. 2024, https://arxiv.org/abs/2407.08608): BF16, head dim 128,
  forward with the causal mask 616 TFLOP/s (648 without it; the abstract's 740 is head dim 256 without
  the mask), backward 561 TFLOP/s (the paper's backward figures are without the causal mask); FP8 forward
  1,171 TFLOP/s (head dim 256 without the mask: the abstract's "close to 1.2 PFLOPs/s"; no FP8 backward
  is published, so the backward is taken at the forward's share).
* FlashAttention-2 on A100 SXM4 (Dao 2023, https://arxiv.org/abs/2307.08691): forward "up to 73% of the
  theoretical maximum FLOPs/s" (abstract); its backward is not tabulated here (taken at the forward's).

These are one kernel alone on the GPU at long sequences: in a training step the attention shares the GPU
with communication kernels, so they are upper bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

FLASH_ATTENTION_2 = "https://arxiv.org/abs/2307.08691"
FLASH_ATTENTION_3 = "https://arxiv.org/abs/2407.08608"


@dataclass(frozen=True)
class AttentionKernel:
    """A published attention kernel's speed: TFLOP/s forward and backward (None: not published, the backward is
    taken at the forward's share) on a GPU of ``peak_tflops`` dense 16-bit peak."""

    name: str
    forward_tflops: float
    backward_tflops: float | None
    peak_tflops: float
    source: str

    @property
    def forward(self) -> float:
        """The forward's share of the GPU's 16-bit peak."""
        return self.forward_tflops / self.peak_tflops

    @property
    def backward(self) -> float:
        """The backward's share of the GPU's 16-bit peak (the forward's where none is published)."""
        return (self.backward_tflops or self.forward_tflops) / self.peak_tflops


ATTENTION_KERNELS: dict[str, AttentionKernel] = {
    "fa3-h100-bf16": AttentionKernel("FlashAttention-3, H100 SXM5, BF16, head dim 128, 16K tokens", 616, 561, 989,
                                     FLASH_ATTENTION_3),
    "fa3-h100-fp8": AttentionKernel("FlashAttention-3, H100 SXM5, FP8 forward, head dim 256, 16K tokens", 1171, None,
                                    989, FLASH_ATTENTION_3),
    "fa2-a100-bf16": AttentionKernel("FlashAttention-2, A100 SXM4, BF16 forward, up to 73% of peak", 0.73 * 312, None,
                                     312, FLASH_ATTENTION_2),
}


def attention_shares(efficiency: float | tuple[float, float] | AttentionKernel | str) -> tuple[float, float]:
    """(forward, backward) shares of the 16-bit peak from one share for both, a pair, an ``AttentionKernel``
    or a key of ``ATTENTION_KERNELS``; each in (0, 2] (2: an FP8 kernel at the FP8 peak)."""
    if isinstance(efficiency, str):
        if efficiency not in ATTENTION_KERNELS:
            raise ValueError(f"attention_efficiency: unknown kernel {efficiency!r}; known: {sorted(ATTENTION_KERNELS)}")
        efficiency = ATTENTION_KERNELS[efficiency]
    if isinstance(efficiency, AttentionKernel):
        shares = (efficiency.forward, efficiency.backward)
    elif isinstance(efficiency, tuple) and len(efficiency) == 2:
        shares = efficiency
    else:
        shares = (efficiency, efficiency)
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s <= 2 for s in shares):
        raise ValueError(f"attention_efficiency must be in (0, 2] (a share of the 16-bit peak), a (forward, backward) "
                         f"pair of them, an AttentionKernel or one of {sorted(ATTENTION_KERNELS)}; got {efficiency!r}")
    return float(shares[0]), float(shares[1])
