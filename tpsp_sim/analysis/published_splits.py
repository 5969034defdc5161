"""Published parallel splits to hold the planner against: Llama 3 405B's pre-training (Table 4 of the paper).

"The Llama 3 Herd of Models" (Meta, 2024, https://arxiv.org/abs/2407.21783), Table 4, "Scaling configurations
and MFU for each stage of Llama 3 405B pre-training", on H100 80 GB GPUs (8 per server, NVLink inside a server,
400 Gb/s RoCE between): the 8K stage on 8,192 and 16,384 GPUs and the 128K long-context stage on 16,384. Each
row trains 16M tokens per step with 16 sequences per data-parallel group; the paper's pipeline balances 126
layers by giving the first and last stage one layer fewer (§3.3.2), ``stage_layers(..., balance="ends")``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PublishedSplit:
    gpus: int
    tp: int
    cp: int
    pp: int
    dp: int
    seq: int
    batch_per_dp: int  # sequences per data-parallel group and step
    tflops_per_gpu: float  # measured, BF16
    mfu: float  # measured, BF16

    @property
    def tokens_per_batch(self) -> int:
        return self.dp * self.batch_per_dp * self.seq


LLAMA3_405B_TABLE4 = (
    PublishedSplit(8192, 8, 1, 16, 64, 8192, 32, 430, 0.43),
    PublishedSplit(16384, 8, 1, 16, 128, 8192, 16, 400, 0.41),
    PublishedSplit(16384, 8, 16, 16, 8, 131072, 16, 380, 0.38),
)
