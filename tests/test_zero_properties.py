"""Property: any world size, bucket size and strategy gives the dense model's step, and the bytes per step
of the closed forms (each call's bytes are floored to whole bytes, so within one byte per call)."""

from __future__ import annotations

import math

from hypothesis import given, settings, strategies as st

import tpsp_sim as ts
from dp_cases import STRATEGIES, assert_same_parameters, batches, tiny_llama, train_dense, train_rank


@settings(max_examples=12, deadline=None)
@given(p=st.integers(1, 6), strategy=st.sampled_from(STRATEGIES), cap=st.sampled_from([0.0005, 0.003, 25]),
       seed=st.integers(0, 3))
def test_one_step_equals_dense_and_sends_the_closed_form(p, strategy, cap, seed):
    model = tiny_llama(n_layers=1)  # seeds torch's global generator: here, not at collection
    data = batches(steps=1, micro=1, batch=p, seed=seed)
    res = ts.run(train_rank, model, data, strategy, cap, world_size=p)
    want = train_dense(model, data)
    for params, _ in res.outputs:
        assert_same_parameters(params, want)
    params = list(model.parameters())
    if strategy == "fsdp":
        blocks = sum(math.ceil(q.shape[0] / p) * p * q[0].numel() * 8 for q in model.blocks.parameters())
        psi = sum(math.ceil(q.shape[0] / p) * p * q[0].numel() * 8 for q in params)
        # the step, then one more all-gather of every module: train_rank unshards them to compare the weights
        closed = (ts.zero_bytes_per_step(blocks, p, 3) + ts.zero_bytes_per_step(psi - blocks, p, 2)
                  + psi * (p - 1) / p)
        sent = res.trace.total(rank=0)
    else:
        stage = 0 if strategy == "ddp" else int(strategy[-1])
        sent = res.trace.total(rank=0, phase="grad_sync")
        # ZeRO pads each bucket to a multiple of p; plain DDP pads nothing
        sizes = _bucket_elements(params, cap)
        psi = 8 * sum(n if stage == 0 else math.ceil(n / p) * p for n in sizes)
        closed = ts.zero_bytes_per_step(psi, p, stage)
    calls = res.trace.count(rank=0, phase="grad_sync") if strategy != "fsdp" else res.trace.count(rank=0)
    assert closed - calls <= sent <= closed


def _bucket_elements(params, cap_mb):
    """Elements per bucket: last parameter first, a bucket closed once it holds cap_mb MiB (torch's rule)."""
    sizes, size = [], 0
    for q in reversed(params):
        if not sizes or size >= cap_mb * 2**20:
            sizes.append(0)
            size = 0
        sizes[-1] += q.numel()
        size += q.numel() * 8
    return sizes
