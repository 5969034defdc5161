"""Closed forms of data parallelism per ZeRO stage: bytes sent per rank and step, memory per rank.

One table of truth for the planner and the checks (ZeRO paper, Rajbhandari et al. 2020, §5 and §7).
Ψ is the parameter bytes of one replica, p the ranks the data-parallel group holds:

    stage  what is sharded over p               bytes sent per rank and step          memory per rank
    0      nothing (plain DDP)                  all-reduce of the gradients: 2Ψ(p−1)/p W + G + O
    1      optimizer state                      reduce-scatter + all-gather: 2Ψ(p−1)/p W + G + O/p
    2      optimizer state, gradients           reduce-scatter + all-gather: 2Ψ(p−1)/p W + (G + O)/p
    3      everything (FSDP, ``fully_shard``)   two all-gathers + a reduce-scatter: 3Ψ(p−1)/p   (W + G + O)/p

W, G, O: the bytes of weights, gradients and optimizer state of one replica (mixed-precision Adam:
2 + 2 + 12 bytes per parameter, ZeRO paper §3.1). Sharded buffers are padded to a multiple of p
elements, so a measured shard is ceil(n/p) elements, never fewer than n/p.
"""

from __future__ import annotations

ZERO_STAGES = (0, 1, 2, 3)
# Collective passes over Ψ per step, each moving Ψ(p−1)/p bytes per rank (all-reduce counts as two).
_PASSES = {0: 2, 1: 2, 2: 2, 3: 3}


def _check(stage: int, p: int) -> None:
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage!r}")
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"the data-parallel size p must be a positive int, got {p!r}")


def zero_bytes_per_step(param_bytes: float, p: int, stage: int) -> float:
    """Bytes each rank sends (= receives) per optimizer step for parameter bytes Ψ: 2Ψ(p−1)/p for
    stages 0–2, 3Ψ(p−1)/p for stage 3 (ZeRO paper §7; one step, however many micro-batches are
    accumulated under ``no_sync``)."""
    _check(stage, p)
    return _PASSES[stage] * param_bytes * (p - 1) / p


def zero_memory_per_rank(n_params: float, p: int, stage: int, *, weight_bytes: float = 2,
                         grad_bytes: float = 2, optimizer_bytes: float = 12) -> dict[str, float]:
    """Bytes per rank of weights, gradients and optimizer state for ``n_params`` parameters, ZeRO ``stage``
    over p ranks (ZeRO paper §5.1; defaults: mixed-precision Adam, 2 + 2 + 12 bytes per parameter)."""
    _check(stage, p)
    weights, grads, optimizer = (n_params * b for b in (weight_bytes, grad_bytes, optimizer_bytes))
    return {"weights": weights / p if stage >= 3 else weights,
            "gradients": grads / p if stage >= 2 else grads,
            "optimizer": optimizer / p if stage >= 1 else optimizer}
