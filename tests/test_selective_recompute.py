"""SelfAttention.recompute_core (Korthikanti et al. 2022, §5): backward recomputes the attention core from
q, k, v. Forward and backward equal the stored run exactly, with dropout on (the same masks are drawn
again, from torch's generator on a dense block and from the ranks' own generators under TP), and the
bytes saved for backward drop by the core's 5as²b/t: 2 + 1 + 2 bytes per score in bf16 (softmax output,
dropout mask, dropped probabilities)."""

from __future__ import annotations

import pytest
import torch

import tpsp_sim as ts
from helpers import local, seeded_randn

H, HEADS, B, S = 24, 4, 2, 12


def recompute(module: torch.nn.Module, on: bool = True) -> None:
    for m in module.modules():
        if isinstance(m, ts.SelfAttention):
            m.recompute_core = on


def test_a_dense_block_with_dropout_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    block = ts.TransformerBlock(H, HEADS, dropout=0.2, attn_dropout=0.3).double()
    x, gy = seeded_randn((B, S, H), (B, S, H))
    results = []
    for on in (False, True):
        recompute(block, on)
        block.zero_grad()
        torch.manual_seed(1)  # the dense block's masks come from torch's global generator
        xi = x.clone().requires_grad_()
        y = block(xi)
        y.backward(gy)
        results.append([y.detach(), xi.grad] + [p.grad.clone() for p in block.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert not torch.equal(results[0][0], block.eval()(x))  # dropout was on


@pytest.mark.parametrize("mode, t", [("tp", 2), ("tp_sp", 3)])
def test_a_parallel_block_with_dropout_gives_the_same_output_and_gradients(mode, t):
    torch.manual_seed(0)
    block = ts.TransformerBlock(H, 6, dropout=0.2, attn_dropout=0.3).double()
    x, gy = seeded_randn((B, S, H), (B, S, H), seed=1)

    def fn(comm, on):
        p = ts.ParallelTransformerBlock.from_dense(block, comm, mode, seed=5)
        recompute(p, on)
        xi = local(x, comm, mode).requires_grad_()
        y = p(xi)
        y.backward(local(gy, comm, mode))
        return [y.detach(), xi.grad] + [q.grad for q in p.parameters()]

    stored, recomputed = (ts.run(fn, on, world_size=t).outputs for on in (False, True))
    for mine, theirs in zip(stored, recomputed):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


@pytest.mark.parametrize("mode, t", [("tp", 2), ("tp_sp", 4)])
def test_the_core_is_no_longer_saved(mode, t):
    s, b, h, a = 32, 2, 32, 4
    torch.manual_seed(0)
    block = ts.TransformerBlock(h, a, dropout=0.1, attn_dropout=0.1).to(torch.bfloat16)
    x = torch.randn(b, s, h, dtype=torch.bfloat16)

    def saved(comm, on):
        p = ts.ParallelTransformerBlock.from_dense(block, comm, mode)
        recompute(p, on)
        with ts.saved_tensor_meter(exclude=p.parameters()) as meter:
            p(local(x, comm, mode).requires_grad_())
        return meter.nbytes

    stored, recomputed = (set(ts.run(saved, on, world_size=t).outputs) for on in (False, True))
    assert len(stored) == len(recomputed) == 1
    assert stored.pop() - recomputed.pop() == 5 * a * s * s * b // t


def test_recompute_with_a_context_parallel_attention_is_refused():
    attn = ts.TransformerBlock(H, HEADS).attn
    attn.recompute_core, attn.attention = True, lambda q, k, v: q
    with pytest.raises(ValueError, match="recompute_core recomputes the dense attention core"):
        attn(torch.randn(1, 4, H))
