"""ts.memory.budget: 18 bytes per parameter for mixed-precision Adam as Megatron counts it, and activations per layer that match
what the simulator's blocks save for backward (Korthikanti et al. 2022, Table 2) within 1%."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import tpsp_sim as ts
from tpsp_sim.analysis.models import MODELS, Model
from tpsp_sim.models.gpt import SelfAttention

# Parameter counts written out from the published shapes (models.py), by hand:
# Llama 3 8B layer: q, o 2·4096² = 33,554,432; k, v 2·4096·1024 = 8,388,608; SwiGLU 3·4096·14336 =
# 176,160,768; norms 8,192 -> 218,112,000 x 32 = 6,979,584,000; embedding + output 2·128256·4096 =
# 1,050,673,152; final norm 4,096.
LLAMA3_8B = 8_030_261_248
# Llama 3 70B layer: 134,217,728 + 16,777,216 + 704,643,072 + 16,384 = 855,654,400 x 80 = 68,452,352,000;
# embedding + output 2·128256·8192 = 2,101,346,304; final norm 8,192.
LLAMA3_70B = 70_553_706_496
# Llama 3 70B on t = 8: (134,217,728 + 704,643,072)/8 + 16,777,216/8 + 16,384 = 106,971,136 per layer,
# x 80 = 8,557,690,880; + 2,101,346,304/8 + 8,192 = 262,676,480.
LLAMA3_70B_TP8 = 8_820_367_360


def test_mixed_precision_adam_is_18_bytes_per_parameter_as_megatron_counts():
    """bf16 weights 2 + fp32 master weights 4 + fp32 main gradients 4 + Adam's moments 8 = 18 bytes
    (Megatron's theoretical_memory_usage.py); the distributed optimizer (ZeRO 1) 6 + 12/(dp·cp)."""
    for name, count in (("llama3-8b", LLAMA3_8B), ("llama3-70b", LLAMA3_70B)):
        b = ts.memory.budget(name, (1, 1, 1), 8192, 1)
        assert b.parameters == count
        assert (b.weights, b.master_weights, b.gradients, b.optimizer) == (2 * count, 4 * count, 4 * count, 8 * count)
        assert b.states == 18 * count
    plain = ts.memory.budget("llama3-70b", (2, 4, 8), 8192, 1, zero=0)
    assert plain.parameters == LLAMA3_70B_TP8 and plain.states == 18 * LLAMA3_70B_TP8
    sharded = ts.memory.budget("llama3-70b", (2, 4, 8), 8192, 1)  # zero=1 by default, over dp·cp = 8
    assert sharded.states == (6 + 12 / 8) * LLAMA3_70B_TP8
    assert (sharded.optimizer, sharded.master_weights) == (8 * LLAMA3_70B_TP8 / 8, 4 * LLAMA3_70B_TP8 / 8)
    fp32 = ts.memory.budget("llama3-8b", (1, 1, 1), 8192, 1, dtype="fp32", zero=0)
    assert (fp32.weights, fp32.master_weights, fp32.gradients) == (4 * LLAMA3_8B, 0, 4 * LLAMA3_8B)
    assert fp32.states == 16 * LLAMA3_8B  # 4 + 4 + 8: the weights are their own master
    bf16_grads = ts.memory.budget("llama3-8b", (1, 1, 1), 8192, 1, grad_dtype="bf16", zero=0)
    assert (bf16_grads.weights, bf16_grads.gradients) == (2 * LLAMA3_8B, 2 * LLAMA3_8B)  # the weights stay bf16


@pytest.mark.parametrize("zero, per_parameter", [(0, 18), (1, 6 + 12 / 6), (2, 2 + 16 / 6), (3, 18 / 6)])
def test_zero_stages_shard_over_dp_times_cp(zero, per_parameter):
    """ZeRO 1 shards master weights and moments, 2 also the gradients, 3 (FSDP) also the weights, over dp·cp = 6."""
    b = ts.memory.budget("llama3-8b", (3, 2, 1), 4096, 1, zero=zero)
    assert b.states == pytest.approx(per_parameter * LLAMA3_8B, rel=1e-12)


def test_output_layer_embedding_and_reserve():
    """Llama 3 8B, s = 16384, cp = 2, t = 1: the output layer keeps 4·s'·b·h·(1 + V/h) = 4·8192·(4096 + 128256)
    bytes, the embedding 8·s' (token ids); the reserve is explicit (2 GiB by default)."""
    b = ts.memory.budget("llama3-8b", (8, 2, 1), 16384, 1, recompute="selective")
    assert b.output_activations == 4 * 8192 * (4096 + 128256) + 8 * 8192
    assert b.activations == 32 * b.activations_per_layer + b.output_activations
    assert b.reserve == 2 * 2**30 == ts.memory.RESERVE_BYTES
    assert b.total == b.states + b.activations + b.reserve
    # Issue 19's case: 76.5 GiB "fitting" before; now over 80 GiB, as Megatron's formula says (published.py)
    assert b.total > 80 * 2**30
    assert ts.memory.budget("llama3-8b", (8, 2, 1), 16384, 1, recompute="selective", reserve=0).total == \
           b.total - 2 * 2**30
    gpt = Model("gpt", 1, 64, 4, 4, 256, 1000, mlp="gelu")  # dropout after the embedding: a 1-byte mask per element
    assert ts.memory.output_activations(gpt, 128, 2, tp=2) == (8 * 256 + 256 * 64 + 4 * 256 * (64 + 1000)) / 2
    for bad, match in (({"zero": 4}, "zero must be one of"), ({"grad_dtype": "fp8"}, "grad_dtype must be one of"),
                       ({"reserve": -1}, "reserve must be >= 0")):
        with pytest.raises(ValueError, match=match):
            ts.memory.budget("llama3-8b", (1, 1, 1), 64, 1, **bad)


def test_kv_heads_are_replicated_beyond_their_count():
    """70B has 8 K/V heads: on t = 16 each K/V head sits on 2 ranks, so k, v do not shrink past t = 8."""
    m = MODELS["llama3-70b"]
    kv = 2 * 8192 * 1024
    assert m.layer_parameters(16) == (2 * 8192**2 + 3 * 8192 * 28672) / 16 + kv / 8 + 2 * 8192


def test_activation_rows_by_hand():
    """Table 2 at s = 4096, b = 1, h = 8192, a = 64, f = 4h, t = 8, cp = 1 and 2."""
    gpt = Model("gpt", 1, 8192, 64, 64, 4 * 8192, 1, mlp="gelu")
    sbh = 4096 * 8192
    assert ts.memory.layer_activations(gpt, 4096, 1, tp=8) == sbh / 8 * (34 + 5 * 64 * 4096 / 8192)
    assert ts.memory.layer_activations(gpt, 4096, 1, tp=8, recompute="selective") == 34 * sbh / 8
    assert ts.memory.layer_activations(gpt, 4096, 1, tp=8, recompute="full") == 2 * sbh / 8
    # cp = 2: half the tokens; the scores of 2048 queries against all 4096 keys
    assert ts.memory.layer_activations(gpt, 4096, 1, cp=2, tp=8) == 34 * sbh / 16 + 5 * 64 * 2048 * 4096 / 8
    # Llama 3 8B, t = 8: K = 12h + 4h·8/32 + 8f = 49152 + 4096 + 114688 = 167936 bytes per token
    assert ts.memory.layer_activations("llama3-8b", 4096, 1, tp=8, recompute="selective") == 4096 * 167936 / 8
    assert ts.memory.layer_activations("llama3-8b", 4096, 1, tp=8) == 4096 * 167936 / 8 + 2 * 32 * 4096**2 / 8
    with pytest.raises(ValueError, match="recompute must be one of"):
        ts.memory.budget(gpt, (1, 1, 1), 64, 1, recompute="some")
    with pytest.raises(ValueError, match="mesh_shape must be"):
        ts.memory.budget(gpt, (1, 8), 64, 1)
    with pytest.raises(ValueError, match="seq=100 must split into cp=3"):
        ts.memory.budget(gpt, (1, 3, 1), 100, 1)


def measure(recompute, t, s, b, h, a):
    """Bytes saved for backward per rank by one TP+SP GPT block in bfloat16, dropout on (parameters excluded).

    Recompute as Megatron does it, with torch.utils.checkpoint: "selective" checkpoints the attention
    core (scores, softmax, dropout, P V), "full" the whole block. Reentrant checkpoints keep their
    inputs with save_for_backward, so the meter sees them (a non-reentrant one holds the same tensors
    by reference, out of the hooks' sight)."""
    torch.manual_seed(0)
    dense = ts.TransformerBlock(h, a, dropout=0.1, attn_dropout=0.1).to(torch.bfloat16)
    x = torch.randn(b, s, h, dtype=torch.bfloat16)

    def fn(comm):
        par = ts.ParallelTransformerBlock.from_dense(dense, comm, "tp_sp")
        if recompute == "selective":
            core = SimpleNamespace(attention=None, head_dim=par.attn.head_dim, causal=True, attn_drop=par.attn.attn_drop)
            par.attn.attention = lambda q, k, v: checkpoint(SelfAttention.attend, core, q, k, v, use_reentrant=True)
        xi = ts.shard_sequence(x, comm.rank, t, dim=1).requires_grad_()
        with ts.saved_tensor_meter(exclude=par.parameters()) as meter:
            y = checkpoint(par, xi, use_reentrant=True) if recompute == "full" else par(xi)
        y.float().sum().backward()  # the recomputation runs: the checkpointed block is a working one
        return meter.nbytes

    return ts.run(fn, world_size=t).outputs


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("s, b, h, a, t", [(64, 2, 64, 4, 2), (32, 3, 96, 8, 4), (128, 1, 128, 4, 1)])
def test_budget_activations_match_the_meter_within_one_percent(recompute, s, b, h, a, t):
    gpt = Model("gpt", 1, h, a, a, 4 * h, 1, mlp="gelu")
    predicted = ts.memory.budget(gpt, (1, 1, t), s, b, recompute=recompute).activations_per_layer  # one block
    measured = measure(recompute, t, s, b, h, a)
    assert len(set(measured)) == 1, "every rank saves the same"
    assert abs(measured[0] - predicted) <= 0.01 * predicted, (measured[0], predicted)
    if recompute == "full":
        assert measured[0] == predicted  # exactly the block's input shard


def test_head_dim_apart_from_d_model():
    """heads x head_dim != d_model: h = 64, 4 heads of 32 (q = 128), 2 K/V heads (k = 64), f = 96. Per layer
    q, o 2·64·128 + k, v 2·64·64 + SwiGLU 3·64·96 + norms 128 = 16,384 + 8,192 + 18,432 + 128 = 43,136;
    activations per token K = 8h + 4q + 4k + 8f = 512 + 512 + 256 + 768 = 2,048 bytes."""
    m = Model("wide heads", 1, 64, 4, 2, 96, 10, head_dim=32)
    assert (m.head_dim, m.q_dim) == (32, 128) and m.layer_parameters() == 43_136
    assert ts.memory.layer_activations(m, 16, 1, recompute="selective") == 16 * 2048
    assert Model("plain", 1, 64, 4, 2, 96, 10).head_dim == 16
    with pytest.raises(ValueError, match="sizes must be integers >= 1"):
        Model("zero", 0, 64, 4, 2, 96, 10)
    plans = ts.plan(m, 64, 1, "h100-nvlink", global_batch_tokens=64, reserve=0)
    assert not any(p.runs for p in plans)
    assert all(p.why == "cannot run: the simulated blocks have n_heads · head_dim = d_model; wide heads has "
                        "4 x 32 = 128 != 64" for p in plans)


@pytest.mark.parametrize("s, b, h, heads, kv_heads, f", [(64, 1, 64, 4, 2, 96), (32, 2, 128, 8, 2, 160),
                                                          (48, 1, 64, 4, 4, 128)])
def test_llama_block_activations_measured_by_the_meter(s, b, h, heads, kv_heads, f):
    """The dense ``ts.LlamaBlock`` in bfloat16, measured by the saved-tensor meter, keeps exactly the
    "selective" row (K = 8h + 4q + 4k + 8f bytes per token: its attention is torch's flash kernel, no
    scores kept) plus what the accounting leaves out, named here:

    * each of the two unfused RMSNorms keeps x·rsqrt (2·s·b·h) and rsqrt itself (2·s·b), besides its
      input and output that the row counts;
    * RoPE's cos and sin tables, fp32 [s, head_dim], kept once for q and once for k: 4 · 4·s·head_dim;
    * the flash kernel's log-sum-exp, fp32 [b, heads, s]: 4·b·heads·s."""
    torch.manual_seed(0)
    dense = ts.LlamaBlock(h, heads, kv_heads, f).to(torch.bfloat16)
    x = torch.randn(b, s, h, dtype=torch.bfloat16, requires_grad=True)
    with ts.saved_tensor_meter(exclude=dense.parameters()) as meter:
        dense(x)
    row = ts.memory.layer_activations(Model("llama", 1, h, heads, kv_heads, f, 10), s, b, recompute="selective")
    d = h // heads
    norms, rope, lse = 2 * (2 * s * b * h + 2 * s * b), 4 * 4 * s * d, 4 * b * heads * s
    assert meter.nbytes == row + norms + rope + lse
    assert row == s * b * (8 * h + 4 * h + 4 * kv_heads * d + 8 * f)
