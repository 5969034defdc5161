"""Llama-style blocks (RMSNorm, RoPE, grouped-query attention, SwiGLU) through the fused, head-aware
parallel layers: every output and gradient equals the dense LlamaBlock in float64, the bytes equal
the closed forms of tensor_parallel/blocks.py, and RoPE on ring / Ulysses shards needs the global positions."""

import copy
import math
from functools import partial

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
import torch.nn.functional as F
from torch import nn

from helpers import local, run_block_stack, seeded_randn
import tpsp_sim as ts
from tpsp_sim.models.dropout import Dropout, DropoutRNG
from tpsp_sim.models.llama import FusedQKVAttention, FusedSwiGLU
from tpsp_sim.tensor_parallel.sharding import replicate

TOL = 1e-12
B, S, H, HEADS, D_FF = 2, 12, 48, 12, 36  # heads, sequence and d_ff divide by 1, 2, 3 and 4
WORLD_SIZES = [1, 2, 3, 4]
KV_HEADS = [12, 6, 2, 1]  # = heads; split over t; replicated when t > n_kv (t=4: 2 -> x2, 1 -> x4)


def make_llama(seed=0, h=H, heads=HEADS, kv=None, d_ff=D_FF, **kwargs):
    """A float64 LlamaBlock whose RMSNorm weights are not ones (so slicing or syncing them wrongly shows)."""
    torch.manual_seed(seed)
    block = ts.LlamaBlock(h, heads, kv, d_ff=d_ff, **kwargs).double()
    with torch.no_grad():
        block.ln1.weight.add_(0.3 * torch.randn(h, dtype=torch.float64))
        block.ln2.weight.add_(0.3 * torch.randn(h, dtype=torch.float64))
    return block


def inputs(seed=1, b=B, s=S, h=H):
    return seeded_randn((b, s, h), (b, s, h), seed=seed)


def dense_run(blocks, x, gy, positions=None):
    x = x.clone().requires_grad_()
    y = x
    for block in blocks:
        block.zero_grad()
        y = block(y, positions)
    y.backward(gy)
    return y.detach(), x.grad, [{n: p.grad.clone() for n, p in block.named_parameters()} for block in blocks]


def parallel_run(blocks, x, gy, t, mode, positions=None, gather=True):
    """(y, dx, dense grads per block, trace): a stack of ParallelTransformerBlocks under scopes block0, block1."""
    return run_block_stack(lambda comm: [ts.ParallelTransformerBlock.from_dense(b, comm, mode) for b in blocks],
                           x, gy, t, mode, positions=positions, gather=gather)


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---- the dense pieces ------------------------------------------------------------------------------

def test_rms_norm_matches_torch():
    torch.manual_seed(0)
    norm = ts.RMSNorm(16, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    assert max_diff(norm(x), F.rms_norm(x, (16,), norm.weight, eps=1e-6)) <= TOL


def test_rope_by_hand():
    """head_dim 2: one pair rotated by angle = position (theta^0 = 1); head_dim 4: the second pair by position/theta^(1/2)."""
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # 3 tokens
    y = ts.rope(x, torch.tensor([0, 1, 3]))
    expected = torch.tensor([[1.0, 0.0], [math.cos(1), math.sin(1)], [-2 * math.sin(3), 2 * math.cos(3)]],
                            dtype=torch.float64)
    assert max_diff(y, expected) <= TOL
    x4 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    y4 = ts.rope(x4, torch.tensor([2, 2]), theta=100.0)  # pairs (0, 2) at angle 2, (1, 3) at angle 2/10
    assert max_diff(y4, torch.tensor([[math.cos(2), 0, math.sin(2), 0], [0, math.cos(0.2), 0, math.sin(0.2)]],
                                     dtype=torch.float64)) <= TOL


def test_rope_scores_depend_only_on_relative_position():
    """<rope(q, m), rope(k, n)> = <rope(q, m + c), rope(k, n + c)> (Su et al. 2021, eq. 16)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, generator=g, dtype=torch.float64), torch.randn(2, 8, generator=g, dtype=torch.float64)
    for m, n in [(0, 5), (7, 2), (3, 3)]:
        scores = [(ts.rope(q[:1], torch.tensor([m + c])) * ts.rope(k[:1], torch.tensor([n + c]))).sum().item()
                  for c in (0, 11, 100)]
        assert max(scores) - min(scores) <= 1e-12
    shifted = (ts.rope(q[:1], torch.tensor([0])) * ts.rope(k[:1], torch.tensor([4]))).sum().item()
    assert abs(shifted - (q[0] * k[0]).sum().item()) > 1e-3  # and the relative position does matter


def test_rope_rejects_bad_shapes():
    with pytest.raises(ValueError, match="head_dim must be even.*3"):
        ts.rope(torch.zeros(4, 3), torch.arange(4))
    with pytest.raises(ValueError, match="one position per token.*5 tokens"):
        ts.rope(torch.zeros(5, 4), torch.arange(4))


def test_grouped_query_attention_equals_repeated_kv_heads():
    """A GQA block = an MHA block whose k, v weights repeat each K/V head for its 12/3 = 4 query heads."""
    gqa = make_llama(kv=3)
    mha = make_llama(kv=HEADS)
    mha.load_state_dict({**gqa.state_dict(), **{
        f"attn.{n}.weight": getattr(gqa.attn, n).weight.unflatten(0, (3, -1)).repeat_interleave(4, 0).flatten(0, 1)
        for n in ("k", "v")}})
    x, _ = inputs()
    assert max_diff(gqa(x), mha(x)) <= TOL


def test_default_d_ff_is_llamas():
    with torch.device("meta"):  # shapes only: a 7B-sized block's weights would take a second to initialise
        assert ts.LlamaBlock(4096, 32).d_ff == 11008  # Llama-2 7B
        assert ts.LlamaBlock(128, 8).d_ff == 512  # int(8·128/3) = 341, rounded up to a multiple of 256


def test_sequence_positions_by_hand():
    assert ts.sequence_positions(8, 1, 2).tolist() == [4, 5, 6, 7]
    assert ts.sequence_positions(8, 1, 2, layout="zigzag").tolist() == [2, 3, 4, 5]
    assert ts.sequence_positions(16, 0, 4, layout="zigzag").tolist() == [0, 1, 14, 15]
    with pytest.raises(ValueError, match="sequence length 10.*divisible by 8"):
        ts.sequence_positions(10, 0, 4, layout="zigzag")


# ---- TP and TP+SP equal dense ---------------------------------------------------------------------

def _valid(kv, t):
    return kv % t == 0 or t % kv == 0


@pytest.mark.parametrize("mode", ["tp", "tp_sp"])
@pytest.mark.parametrize("t", WORLD_SIZES)
@pytest.mark.parametrize("kv", KV_HEADS)
def test_parallel_llama_stack_equals_dense(mode, t, kv):
    """Two stacked blocks: output, input gradient and every parameter gradient (under the dense names)."""
    blocks = [make_llama(seed=0, kv=kv), make_llama(seed=1, kv=kv)]
    x, gy = inputs()
    if not _valid(kv, t):
        with pytest.raises(ts.RankFailedError, match=f"n_kv_heads={kv}.*t={t}"):
            parallel_run(blocks, x, gy, t, mode)
        return
    y, dx, grads = dense_run(blocks, x, gy)
    py, pdx, pgrads, _ = parallel_run(blocks, x, gy, t, mode)
    assert max_diff(py, y) <= TOL and max_diff(pdx, dx) <= TOL
    for rank_grads in pgrads:
        for dense, got in zip(grads, rank_grads):
            assert sorted(got) == sorted(dense)
            for name in dense:
                assert max_diff(got[name], dense[name]) <= TOL, name


@pytest.mark.parametrize("mode", ["tp", "tp_sp"])
def test_parallel_llama_takes_positions(mode):
    """Positions pass through to RoPE: tokens at positions 37, 40, 43, ... (a shift alone would change
    nothing: RoPE scores see only relative positions) still equal dense."""
    blocks = [make_llama(kv=2)]
    x, gy = inputs()
    positions = 3 * torch.arange(S) + 37
    y, dx, grads = dense_run(blocks, x, gy, positions)
    assert max_diff(y, dense_run(blocks, x, gy)[0]) > 1e-3  # the positions matter
    py, pdx, pgrads, _ = parallel_run(blocks, x, gy, 4, mode, positions)
    assert max_diff(py, y) <= TOL and max_diff(pdx, dx) <= TOL
    assert all(max_diff(pgrads[0][0][n], g) <= TOL for n, g in grads[0].items())


def test_kv_replicas_hold_the_summed_gradient():
    """t=4, 2 K/V heads: ranks (0, 1) share K/V head 0 and (2, 3) head 1; after backward each replica's
    k, v rows hold the dense gradient of its head, not the half its two query heads contributed."""
    block = make_llama(kv=2)
    x, gy = inputs()
    _, _, grads = dense_run([block], x, gy)
    d = H // HEADS

    def fn(comm):
        par = ts.ParallelTransformerBlock.from_dense(block, comm, "tp")
        par(x.clone()).backward(gy)
        q_rows = HEADS // 4 * d
        return par.attn.qkv.weight.grad[q_rows:q_rows + d], par.attn.qkv.weight.grad[q_rows + d:]

    outs = ts.run(fn, world_size=4).outputs
    for rank, (gk, gv) in enumerate(outs):
        head = slice(rank // 2 * d, (rank // 2 + 1) * d)
        assert max_diff(gk, grads[0]["attn.k.weight"][head]) <= TOL
        assert max_diff(gv, grads[0]["attn.v.weight"][head]) <= TOL


def test_gather_dense_grads_catches_diverged_replicas():
    block = make_llama(kv=1)

    def fn(comm):
        par = ts.ParallelTransformerBlock.from_dense(block, comm, "tp")
        par(inputs()[0]).sum().backward()
        if comm.rank == 1:
            par.attn.qkv.weight.grad[-1] += 1.0
        return ts.gather_dense_grads(par)

    with pytest.raises(ts.RankFailedError, match=r"replicated heads of 'attn.v.weight' differs.*by up to 1"):
        ts.run(fn, world_size=2)


def test_fused_column_gather_output_is_dense_concatenation():
    """gather_output puts the fused, replicated pieces back in dense order: [q(x) | k(x) | v(x)]."""
    torch.manual_seed(0)
    q, k, v = (nn.Linear(16, n, bias=True).double() for n in (32, 8, 8))  # 8 heads of 4, 2 K/V heads
    x = torch.randn(2, 3, 16, dtype=torch.float64)

    def fn(comm):
        layer = ts.ColumnParallelLinear.from_dense([q, k, v], comm, heads=(8, 2, 2), gather_output=True)
        return layer(x), ts.gather_dense_parameters(layer)

    for y, params in ts.run(fn, world_size=4).outputs:
        assert max_diff(y, torch.cat([q(x), k(x), v(x)], -1)) <= TOL
        assert sorted(params) == ["0.bias", "0.weight", "1.bias", "1.weight", "2.bias", "2.weight"]
        assert torch.equal(params["1.weight"], k.weight) and torch.equal(params["2.bias"], v.bias)


@settings(max_examples=15, deadline=None)
@given(t=st.integers(1, 4), kv=st.sampled_from([1, 2, 3, 4, 6, 8]), group=st.integers(1, 3),
       head_dim=st.integers(1, 3), bias=st.booleans())
def test_fused_column_round_trips_any_valid_gqa_split(t, kv, group, head_dim, bias):
    """For every split or replication that fits, the fused layer's parameters gather back to the dense
    ones exactly, under the dense names, and its gathered output is [q(x) | k(x) | v(x)]."""
    heads = kv * group
    assume((kv % t == 0 or t % kv == 0) and heads % t == 0)
    torch.manual_seed(heads * 10 + head_dim)
    q, k, v = (nn.Linear(8, n * head_dim, bias=bias).double() for n in (heads, kv, kv))
    x = torch.randn(2, 3, 8, dtype=torch.float64)

    def fn(comm):
        layer = ts.ColumnParallelLinear.from_dense([q, k, v], comm, heads=(heads, kv, kv), names=("q", "k", "v"),
                                                   gather_output=True)
        return layer(x), ts.gather_dense_parameters(layer)

    for y, params in ts.run(fn, world_size=t).outputs:
        assert max_diff(y, torch.cat([q(x), k(x), v(x)], -1)) <= TOL
        assert params.keys() == {f"{n}.{leaf}" for n in "qkv" for leaf in (("weight", "bias") if bias else ("weight",))}
        for name, lin in (("q", q), ("k", k), ("v", v)):
            assert torch.equal(params[f"{name}.weight"], lin.weight)


def test_meta_tensors_gather_dense_shapes():
    """The meta device runs the whole path (forward, backward, gather) with shapes only."""
    with torch.device("meta"):
        block = ts.LlamaBlock(64, 8, 2, d_ff=96)
        x = torch.empty(2, 8, 64)

    def fn(comm):
        par = ts.ParallelTransformerBlock.from_dense(block, comm, "tp_sp")
        par(local(x, comm, "tp_sp")).sum().backward()
        return ts.gather_dense_parameters(par), ts.gather_dense_grads(par)

    for params, grads in ts.run(fn, world_size=4).outputs:
        for name, p in block.named_parameters():
            assert params[name].is_meta and params[name].shape == p.shape
            assert grads[name].is_meta and grads[name].shape == p.shape


# ---- communication: closed forms, and fused against one layer per projection -----------------------

class Concat(nn.ModuleList):
    """One column layer per projection, outputs concatenated: the unfused way to the same per-rank layout."""

    def forward(self, x):
        return torch.cat([layer(x) for layer in self], -1)


def per_projection_block(block, comm, mode):
    """A ParallelTransformerBlock whose q, k, v, gate and up are separate ColumnParallelLinears."""
    sp, t, a = mode == "tp_sp", comm.world_size, block.attn
    column = partial(ts.ColumnParallelLinear.from_dense, comm=comm, sequence_parallel=sp)
    row = partial(ts.RowParallelLinear.from_dense, comm=comm, sequence_parallel=sp)
    attn = FusedQKVAttention.from_dense(a, Concat([column(a.q), column(a.k), column(a.v)]), row(a.o), t)
    mlp = FusedSwiGLU(Concat([column(block.mlp.gate), column(block.mlp.up)]), row(block.mlp.down))
    rng = DropoutRNG(0, comm)
    return ts.ParallelTransformerBlock(comm, mode, rng, replicate(block.ln1, sequence_parallel=sp), attn,
                                       Dropout(0.0, rng), replicate(block.ln2, sequence_parallel=sp), mlp,
                                       Dropout(0.0, rng))


# b=2, s=16, h=128, float64: E·e = 2·16·128·8 = 32768 bytes; d_head = 128/8 = 16.
# Replicated K/V rows (t=4, 2 K/V heads, g=2): 2(g-1)/g · 2·h·d_head·e = 1 · 2·128·16·8 = 32768.
BYTES = {  # (mode, t): (forward, backward) bytes sent by one rank
    ("tp", 2): (65536, 65536),        # 4·(1/2)·32768 each way
    ("tp", 4): (98304, 131072),       # 4·(3/4)·32768; backward + 32768 (replicas)
    ("tp_sp", 2): (65536, 98304),     # 4·(1/2)·32768; 6·(1/2)·32768
    ("tp_sp", 4): (98304, 180224),    # 4·(3/4)·32768; 6·(3/4)·32768 + 32768
}


@pytest.mark.parametrize("mode, t", list(BYTES))
def test_llama_block_bytes_equal_closed_form(mode, t):
    block = make_llama(h=128, heads=8, kv=2, d_ff=192)
    x, gy = inputs(b=2, s=16, h=128)
    _, _, _, trace = parallel_run([block], x, gy, t, mode, gather=False)
    for rank in range(t):
        forward, backward = BYTES[mode, t]
        assert trace.total(rank=rank, phase="forward") == forward
        assert trace.total(rank=rank, phase="backward") == backward
    expected = {"all_reduce": 2} if mode == "tp" else {"all_gather": 2, "reduce_scatter": 2}
    assert dict(trace.ops(rank=0, phase="forward")) == expected


def test_fused_layers_beat_one_layer_per_projection():
    """t=2, 2 K/V heads (no replication). One layer per projection adds an f per extra column layer under
    TP (backward 5 all-reduces, not 2: x2.5) and under TP+SP a gather per extra layer in forward
    (5 AG + 2 RS = 7 units of 16384 bytes, not 4: x1.75) and an RS + AG each in backward (12 units, not 6: x2)."""
    block = make_llama(h=128, heads=8, kv=2, d_ff=192)
    x, gy = inputs(b=2, s=16, h=128)
    y, dx, _ = dense_run([block], x, gy)
    per_projection = {("tp", "forward"): 65536, ("tp", "backward"): 163840,            # 5·2·(1/2)·32768
                      ("tp_sp", "forward"): 114688, ("tp_sp", "backward"): 196608}     # 7·16384, 12·16384
    factor = {("tp", "forward"): 1.0, ("tp", "backward"): 2.5, ("tp_sp", "forward"): 1.75, ("tp_sp", "backward"): 2.0}
    for mode in ("tp", "tp_sp"):
        def fn(comm):
            par = per_projection_block(block, comm, mode)
            xi = local(x, comm, mode).requires_grad_()
            yi = par(xi)
            yi.backward(local(gy, comm, mode))
            return yi.detach(), xi.grad

        res = ts.run(fn, world_size=2)
        join = (lambda xs: torch.cat(xs, 1)) if mode == "tp_sp" else (lambda xs: xs[0])
        assert max_diff(join([o[0] for o in res.outputs]), y) <= TOL  # unfused is exact too, just dearer
        assert max_diff(join([o[1] for o in res.outputs]), dx) <= TOL
        fused = parallel_run([block], x, gy, 2, mode, gather=False)[3]
        for phase in ("forward", "backward"):
            unfused_bytes = res.trace.total(rank=0, phase=phase)
            assert unfused_bytes == per_projection[mode, phase]
            assert unfused_bytes / fused.total(rank=0, phase=phase) == factor[mode, phase]


# ---- bad sizes ------------------------------------------------------------------------------------

def test_bad_dense_sizes():
    with pytest.raises(ValueError, match="LlamaBlock: d_model=50.*n_heads=8"):
        ts.LlamaBlock(50, 8)
    with pytest.raises(ValueError, match="LlamaBlock: d_model=24.*n_heads=8"):  # head_dim 3 is odd
        ts.LlamaBlock(24, 8)
    with pytest.raises(ValueError, match="n_heads=12 is not a multiple of n_kv_heads=5"):
        ts.LlamaBlock(48, 12, 5)


@pytest.mark.parametrize("kwargs, t, message", [
    (dict(heads=8, kv=8, h=32), 3, "n_heads=8 is not divisible by the tensor-parallel size t=3"),
    (dict(heads=12, kv=6, h=48), 4, "attn.qkv: n_kv_heads=6 K/V heads.*t=4"),
    (dict(heads=12, kv=12, h=48, d_ff=30), 4, "d_ff=30 is not divisible by the tensor-parallel size t=4"),
])
def test_bad_parallel_sizes(kwargs, t, message):
    block = make_llama(**kwargs)
    with pytest.raises(ts.RankFailedError, match=message):
        ts.run(lambda comm: ts.ParallelTransformerBlock.from_dense(block, comm, "tp"), world_size=t)


def test_bad_fused_column_sizes():
    q, k, v = nn.Linear(16, 32, bias=False), nn.Linear(16, 12, bias=False), nn.Linear(16, 12, bias=False)
    cases = [
        (dict(heads=(8, 3, 3)), 2, r"\[q, k, v\]\): k has 3 heads, which cannot be split over t=2"),
        (dict(heads=(8, 5, 5)), 2, r"k has 12 output features, not divisible into 5 heads"),
        (dict(heads=(8, 3, 3), stride=3), 1, "stride or fused linears, not both"),
        (dict(heads=(8, 3)), 1, "got 3 linears, heads=\\(8, 3\\)"),
    ]
    for kwargs, t, message in cases:
        with pytest.raises(ts.RankFailedError, match=message):
            ts.run(lambda comm: ts.ColumnParallelLinear.from_dense([q, k, v], comm, names=("q", "k", "v"), **kwargs),
                   world_size=t)
    gate, up = nn.Linear(16, 30, bias=False), nn.Linear(16, 30, bias=False)
    with pytest.raises(ts.RankFailedError, match=r"\[0, 1\]\): 0 has 30 output features, which cannot be split over t=4"):
        ts.run(lambda comm: ts.ColumnParallelLinear.from_dense([gate, up], comm), world_size=4)
    with pytest.raises(ts.RankFailedError, match="share in_features"):
        ts.run(lambda comm: ts.ColumnParallelLinear.from_dense([q, nn.Linear(8, 32)], comm), world_size=2)


# ---- RoPE on context-parallel shards ---------------------------------------------------------------

CP_CASES = [("ring", "contiguous", 2), ("ring", "contiguous", 4), ("ring", "zigzag", 2), ("ring", "zigzag", 4),
            ("ulysses", "contiguous", 2), ("ulysses", "contiguous", 4)]


@pytest.mark.parametrize("method, layout, p", CP_CASES)
def test_context_parallel_llama_needs_global_positions(method, layout, p):
    """Weights replicated, sequence sharded (layout), attention by ring or Ulysses: with
    sequence_positions the block equals dense forward and backward; with local positions it does not."""
    block = make_llama(h=32, heads=8, kv=4, d_ff=40)
    x, gy = inputs(b=2, s=16, h=32)
    y, dx, grads = dense_run([block], x, gy)

    def fn(comm, use_global):
        mine = copy.deepcopy(block)
        mine.attn.attention = (partial(ts.ring_attention, comm=comm, causal=True, layout=layout) if method == "ring"
                               else partial(ts.ulysses_attention, comm=comm, causal=True))
        xi = ts.shard_sequence(x, comm.rank, p, dim=1, layout=layout).requires_grad_()
        positions = (ts.sequence_positions(16, comm.rank, p, layout) if use_global
                     else torch.arange(16 // p))
        yi = mine(xi, positions)
        yi.backward(ts.shard_sequence(gy, comm.rank, p, dim=1, layout=layout))
        return yi.detach(), xi.grad, {n: comm.all_reduce(q.grad) for n, q in mine.named_parameters()}

    res = ts.run(fn, world_size=p, use_global=True)
    assert max_diff(ts.unshard_sequence([o[0] for o in res.outputs], dim=1, layout=layout), y) <= TOL
    assert max_diff(ts.unshard_sequence([o[1] for o in res.outputs], dim=1, layout=layout), dx) <= TOL
    for name, g in grads[0].items():
        assert max_diff(res.outputs[0][2][name], g) <= TOL, name
    wrong = ts.run(fn, world_size=p, use_global=False)
    assert max_diff(ts.unshard_sequence([o[0] for o in wrong.outputs], dim=1, layout=layout), y) > 1e-2


# ---- real processes ---------------------------------------------------------------------------------

def llama_tp_sp_step(comm, block, x, gy):
    """One TP+SP step of a Llama block (module level: gloo workers import it by name)."""
    par = ts.ParallelTransformerBlock.from_dense(block, comm, "tp_sp")
    xi = local(x, comm, "tp_sp").requires_grad_()
    with comm.scope("block0"):
        y = par(xi)
    y.backward(local(gy, comm, "tp_sp"))
    ts.sync_sequence_parallel_grads(par, comm)
    return y.detach(), xi.grad, ts.gather_dense_grads(par)


@pytest.mark.real
@pytest.mark.timeout(180)
def test_gloo_runs_the_replicated_kv_block_like_the_simulator():
    """t=4, 2 K/V heads: the replica groups (new_group) and their gradient all-reduce on real processes."""
    block = make_llama(kv=2)
    x, gy = inputs()
    sim = ts.run(llama_tp_sp_step, block, x, gy, world_size=4)
    real = ts.run(llama_tp_sp_step, block, x, gy, world_size=4, backend="gloo")
    y, dx, grads = dense_run([block], x, gy)
    for rank, out in enumerate(real.outputs):  # gloo sums in its own order: equal to dense within TOL, not bitwise
        assert max_diff(out[0], ts.shard_sequence(y, rank, 4, dim=1)) <= TOL
        assert max_diff(out[1], ts.shard_sequence(dx, rank, 4, dim=1)) <= TOL
        assert all(max_diff(out[2][name], g) <= TOL for name, g in grads[0].items())
    assert real.trace.filter(scope="block0").events == sim.trace.filter(scope="block0").events
    assert real.trace.ops(scope="block0", phase="backward")["all_reduce"] == 4  # one replica sum per rank


def test_fused_qkv_attention_from_dense_takes_the_heads_of_one_rank_or_refuses():
    dense = make_llama(h=64, heads=8, kv=2, d_ff=32).attn
    for t, kv_per_rank in ((1, 2), (2, 1), (4, 1), (8, 1)):  # t = 4, 8: one replica of a K/V head per rank
        attn = FusedQKVAttention.from_dense(dense, nn.Identity(), nn.Identity(), t)
        assert (attn.n_heads, attn.n_kv_heads, attn.head_dim) == (8 // t, kv_per_rank, 8)
        assert (attn.rope_theta, attn.causal) == (dense.rope_theta, dense.causal)
    for t in (3, 16):
        with pytest.raises(ValueError, match=f"8 query heads and 2 K/V heads cannot be split over tp_size={t}"):
            FusedQKVAttention.from_dense(dense, nn.Identity(), nn.Identity(), t)
