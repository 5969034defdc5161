"""ParallelTransformerBlock ("tp", "tp_sp") equals the dense TransformerBlock, forward and every
gradient, in float64; its trace matches the closed-form communication of Korthikanti et al. 2022."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import local, run_block_stack, seeded_randn
import tpsp_sim as ts

TOL = 1e-10
B, S, H, HEADS = 2, 12, 48, 12  # heads, sequence and d_ff = 4H divide by 1, 2, 3 and 4
WORLD_SIZES = [1, 2, 3, 4]


def make_block(dropout=0.0, attn_dropout=0.0, causal=True, seed=0, dtype=torch.float64, h=H, heads=HEADS):
    """A dense block whose LayerNorm weights and biases are not ones and zeros (so slicing them wrongly shows)."""
    torch.manual_seed(seed)
    block = ts.TransformerBlock(h, heads, dropout=dropout, attn_dropout=attn_dropout, causal=causal).to(dtype)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.startswith("ln"):
                p.add_(0.3 * torch.randn_like(p))
    return block


def inputs(seed=1, b=B, s=S, h=H):
    return seeded_randn((b, s, h), (b, s, h), seed=seed)


def dense_run(blocks, x, gy, seed=None):
    x = x.clone().requires_grad_()
    y = x
    for i, block in enumerate(blocks):
        block.zero_grad()
        if seed is not None:
            block.manual_seed(seed + i)
        y = block(y)
    y.backward(gy)
    return y.detach(), x.grad


def parallel_run(blocks, x, gy, t, mode, seed=0, exact_dropout=False):
    """A stack of parallel blocks under scopes block0, block1, ...; returns (y, dx, dense grads per block, trace), full."""
    return run_block_stack(lambda comm: [ts.ParallelTransformerBlock.from_dense(
        b, comm, mode, seed=seed + i, exact_dropout=exact_dropout) for i, b in enumerate(blocks)], x, gy, t, mode)


def assert_close(a, b):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= TOL


def assert_equal_to_dense(blocks, x, gy, t, mode, dropout_seed=None):
    y, dx = dense_run(blocks, x, gy, dropout_seed)
    py, pdx, grads, trace = parallel_run(blocks, x, gy, t, mode, seed=dropout_seed or 0,
                                         exact_dropout=dropout_seed is not None)
    assert_close(py, y)
    assert_close(pdx, dx)
    for rank_grads in grads:
        for block, block_grads in zip(blocks, rank_grads):
            names = [n for n, _ in block.named_parameters()]
            assert list(block_grads) == names
            for name, p in block.named_parameters():
                assert_close(block_grads[name], p.grad)
    return trace


# ---- the dense reference ------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_dense_block_equals_an_independent_formulation(causal):
    """Fused qkv layout [q | k | v], each [heads, head_dim]; checked with torch's own SDPA and layer_norm."""
    block = make_block(causal=causal)
    x, _ = inputs()
    w_q, w_k, w_v = block.attn.qkv.weight.chunk(3)
    b_q, b_k, b_v = block.attn.qkv.bias.chunk(3)

    def heads(z):
        return z.view(B, S, HEADS, H // HEADS).transpose(1, 2)

    h = F.layer_norm(x, (H,), block.ln1.weight, block.ln1.bias)
    o = F.scaled_dot_product_attention(heads(h @ w_q.T + b_q), heads(h @ w_k.T + b_k), heads(h @ w_v.T + b_v),
                                       is_causal=causal)
    x1 = x + block.attn.proj(o.transpose(1, 2).reshape(B, S, H))
    h2 = F.layer_norm(x1, (H,), block.ln2.weight, block.ln2.bias)
    y = x1 + block.mlp.fc2(F.gelu(block.mlp.fc1(h2)))
    assert_close(block(x), y)
    assert block.d_ff == 4 * H


def test_dense_block_dropout_follows_its_seed():
    block = make_block(dropout=0.3, attn_dropout=0.3)
    x, _ = inputs()
    a, b, c = block.manual_seed(5)(x), block.manual_seed(5)(x), block.manual_seed(6)(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(block.eval()(x), make_block()(x)), "no dropout in eval mode"


# ---- parallel == dense, forward and backward ----------------------------------------------------

@pytest.mark.parametrize("t", WORLD_SIZES)
@pytest.mark.parametrize("mode", ["tp", "tp_sp"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "exactdrop"])
def test_parallel_block_equals_dense(t, mode, causal, dropout):
    p = 0.2 if dropout else 0.0
    block = make_block(dropout=p, attn_dropout=p, causal=causal)
    x, gy = inputs()
    assert_equal_to_dense([block], x, gy, t, mode, dropout_seed=11 if dropout else None)


@pytest.mark.parametrize("t", [3, 4])
@pytest.mark.parametrize("mode", ["tp", "tp_sp"])
def test_stack_of_blocks_equals_dense(t, mode):
    blocks = [make_block(dropout=0.1, attn_dropout=0.1, seed=i) for i in range(3)]
    x, gy = inputs()
    trace = assert_equal_to_dense(blocks, x, gy, t, mode, dropout_seed=3)
    for i in range(3):  # every block reads separately in the trace
        assert trace.count(scope=f"block{i}", phase="forward", rank=0) == (4 if mode == "tp_sp" else 2)


def test_other_shapes_and_a_non_default_d_ff():
    torch.manual_seed(0)
    block = ts.TransformerBlock(30, 6, d_ff=18, causal=True).double()
    x, gy = inputs(b=3, s=9, h=30)
    for mode in ("tp", "tp_sp"):
        assert_equal_to_dense([block], x, gy, 3, mode)


# ---- communication ------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_trace_per_block_matches_the_closed_forms(t, dtype):
    blocks = [make_block(dtype=dtype, seed=i) for i in range(2)]
    x, gy = (z.to(dtype) for z in inputs())
    n = B * S * H * x.element_size()  # bytes of one [b, s, h] activation
    traces = {mode: parallel_run(blocks, x, gy, t, mode)[3] for mode in ("tp", "tp_sp")}
    tp, sp = traces["tp"], traces["tp_sp"]
    for r in range(t):
        for i in range(2):
            for sub in ("attn", "mlp"):
                scope = f"block{i}/{sub}"
                assert tp.ops(scope=scope, phase="forward", rank=r) == {"all_reduce": 1}
                assert tp.ops(scope=scope, phase="backward", rank=r) == {"all_reduce": 1}
                assert sp.ops(scope=scope, phase="forward", rank=r) == {"all_gather": 1, "reduce_scatter": 1}
                assert sp.ops(scope=scope, phase="backward", rank=r) == {"all_gather": 2, "reduce_scatter": 1}
            block = dict(scope=f"block{i}", rank=r)
            for e in sp.filter(**block).events:
                assert e.shape == ((B, S // t, H) if e.op == "all_gather" else (B, S, H))
            assert tp.total(phase="forward", **block) == 2 * 2 * (t - 1) * n // t      # 2 all-reduces
            assert sp.total(phase="forward", **block) == 2 * ((t - 1) * n // t + (t - 1) * n // t)  # 2 AG + 2 RS
            assert sp.total(phase="forward", **block) == tp.total(phase="forward", **block)
            assert tp.total(phase="backward", **block) == tp.total(phase="forward", **block)
            assert sp.total(phase="backward", **block) == 3 * 2 * (t - 1) * n // t    # + 2 re-gathers of the input
            assert sp.total("recv_bytes", **block) == sp.total(**block)


def test_the_seeds_claim_that_sp_moves_more_bytes_than_tp_is_wrong():
    blocks = [make_block()]
    x, gy = inputs()
    tp, sp = (parallel_run(blocks, x, gy, 4, mode)[3] for mode in ("tp", "tp_sp"))
    assert sp.total(phase="forward", scope="block0") == tp.total(phase="forward", scope="block0") > 0
    # an all-reduce *is* a reduce-scatter followed by an all-gather: SP moves the all-gather elsewhere
    for sub in ("block0/attn", "block0/mlp"):
        assert sp.total(phase="forward", op="all_gather", scope=sub) == sp.total(
            phase="forward", op="reduce_scatter", scope=sub) == tp.total(phase="forward", scope=sub) // 2


# ---- dropout ------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [2, 4])
def test_sequence_shards_get_different_dropout_masks(t):
    """Every token of the input is the same vector and attention is not causal, so without dropout
    every position of the output is equal: shards that shared one mask would give equal outputs."""
    block = make_block(dropout=0.5, causal=False)
    x = torch.randn(1, 1, H, dtype=torch.float64).expand(B, S, H).contiguous()

    def fn(comm, seed):
        p = ts.ParallelTransformerBlock.from_dense(block, comm, "tp_sp", seed=seed)
        return p(local(x, comm, "tp_sp")).detach()

    outs = ts.run(fn, 0, world_size=t).outputs
    for r in range(1, t):
        assert not torch.allclose(outs[r], outs[0])
    assert all(torch.equal(a, b) for a, b in zip(outs, ts.run(fn, 0, world_size=t).outputs)), "reproducible"
    assert not torch.equal(outs[0], ts.run(fn, 1, world_size=t).outputs[0]), "the seed matters"
    without = ts.run(lambda comm: ts.ParallelTransformerBlock.from_dense(block, comm, "tp_sp").eval()(
        local(x, comm, "tp_sp")).detach(), world_size=t).outputs
    assert all(torch.allclose(w, without[0], atol=TOL) for w in without)


def test_tp_dropout_keeps_replicated_activations_identical_across_ranks():
    block = make_block(dropout=0.5, attn_dropout=0.5)
    x, _ = inputs()
    outs = ts.run(lambda comm: ts.ParallelTransformerBlock.from_dense(block, comm, "tp", seed=3)(x.clone()).detach(),
                  world_size=4).outputs
    assert all(torch.equal(o, outs[0]) for o in outs)


# ---- a training step ----------------------------------------------------------------------------

@pytest.mark.parametrize("t", [2, 3, 4])
def test_sp_training_step_keeps_layernorm_weights_identical_and_equal_to_dense(t):
    block = make_block()
    x, gy = inputs()
    dense_run([block], x, gy)
    with torch.no_grad():
        expected = {n: p - 0.1 * p.grad for n, p in block.named_parameters()}

    def fn(comm, sync):
        p = ts.ParallelTransformerBlock.from_dense(block, comm, "tp_sp")
        opt = torch.optim.SGD(p.parameters(), lr=0.1)
        p(local(x, comm, "tp_sp")).backward(local(gy, comm, "tp_sp"))
        if sync:
            ts.sync_sequence_parallel_grads(p, comm)
        opt.step()
        return {n: w.detach() for n, w in p.named_parameters() if n.startswith("ln")}, ts.gather_dense_parameters(p)

    outs = ts.run(fn, True, world_size=t).outputs
    for ln, dense in outs:
        assert all(torch.equal(w, outs[0][0][n]) for n, w in ln.items()), "bitwise identical on every rank"
        for n, w in expected.items():
            assert_close(dense[n], w)
    with pytest.raises(ValueError, match="ln1.weight' differs between ranks"):
        ts.run(fn, False, world_size=t)  # without the sync, each rank steps with its own tokens' gradient


# ---- sizes that do not divide -------------------------------------------------------------------

def test_sizes_that_do_not_divide_raise_value_errors_with_the_numbers():
    with pytest.raises(ValueError, match="n_heads=6 is not divisible by the tensor-parallel size t=4"):
        ts.run(lambda comm: ts.ParallelTransformerBlock.from_dense(ts.TransformerBlock(24, 6), comm, "tp"), world_size=4)
    with pytest.raises(ValueError, match="d_ff=10 is not divisible by the tensor-parallel size t=4"):
        ts.run(lambda comm: ts.ParallelTransformerBlock.from_dense(ts.TransformerBlock(16, 4, d_ff=10), comm, "tp_sp"),
               world_size=4)
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=4"):
        ts.TransformerBlock(10, 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        ts.run(lambda comm: ts.ParallelTransformerBlock.from_dense(ts.TransformerBlock(8, 2), comm, "sp"), world_size=2)
    with pytest.raises(ValueError, match="sequence length 10 .* not divisible by 4"):
        ts.run(lambda comm: local(torch.zeros(1, 10, 8), comm, "tp_sp"), world_size=4)


# ---- real torch.distributed ---------------------------------------------------------------------

def train_step(comm, block, x, gy, mode):
    """Module level, so real processes can import it: one forward + backward, gradients synced and gathered."""
    p = ts.ParallelTransformerBlock.from_dense(block, comm, mode)
    xi = local(x, comm, mode).requires_grad_()
    with comm.scope("block0"):
        y = p(xi)
    y.backward(local(gy, comm, mode))
    if mode == "tp_sp":
        ts.sync_sequence_parallel_grads(p, comm)
    return y.detach(), xi.grad, ts.gather_dense_grads(p)


@pytest.mark.real
@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["tp", "tp_sp"])
def test_on_gloo_processes_equals_dense_and_the_simulators_trace(mode):
    block = make_block()
    x, gy = inputs()
    y, dx = dense_run([block], x, gy)
    sim, real = (ts.run(train_step, block, x, gy, mode, world_size=2, backend=backend) for backend in ("sim", "gloo"))
    join = (lambda xs: torch.cat(xs, 1)) if mode == "tp_sp" else (lambda xs: xs[0])
    assert_close(join([o[0] for o in real.outputs]), y)
    assert_close(join([o[1] for o in real.outputs]), dx)
    for name, p in block.named_parameters():
        assert_close(real.outputs[1][2][name], p.grad)
    assert real.trace.events == sim.trace.events


# ---- the benchmark script runs ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(300)  # a subprocess; LocalTensorMode imports torch._dynamo (~10 s)
def test_benchmark_script_runs_on_tiny_sizes():
    script = Path(__file__).parent.parent / "benchmarks" / "block.py"
    out = subprocess.run([sys.executable, str(script), "--batch", "1", "--seq", "16", "--hidden", "16", "--heads", "4",
                          "--ranks", "2", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "simulator / dense" in out.stdout and "| 2 |" in out.stdout
