"""PyTorch's own parallel code on virtual ranks, exact against the dense models in float64 and byte-counted:
the seed's TP+SP block and ring attention in their dist.* form (their bugs fixed), a DTensor TP+SP plan on ts.LlamaBlock
(bytes call by call against the package's TP+SP block), FSDP2 fully_shard on ts.TinyLlama (bytes
against the ZeRO-3 closed form), DistributedDataParallel (one all-reduce of the gradients) and
torch.distributed.pipelining (each micro-batch sent once each way)."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

import tpsp_sim as ts

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
TOL = 1e-12


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def block_events(trace, rank=0, scope=None):
    """(op, phase, input bytes) of one rank's calls, in program order (under ``scope`` if given)."""
    return [(e.op, e.phase, e.nbytes) for e in trace.events
            if e.rank == rank and (scope is None or e.scope.startswith(scope))]


def package_block_events(dense, x, gy, t):
    """``block_events`` of the package's own TP+SP block (hybrid/block.py) on the same input."""
    def fn(comm):
        par = ts.ParallelTransformerBlock.from_dense(dense, comm, "tp_sp")
        par(x.chunk(t, 1)[comm.rank].clone().requires_grad_()).backward(gy.chunk(t, 1)[comm.rank])
    return block_events(ts.run(fn, world_size=t).trace)


# ---- the seed's TP+SP block in dist.* form, fixed -------------------------------------------------
# Copied from the seed notebook (shared/seed/seed_notebook.txt, "TPSPTransformerBlock" and the layers it
# uses, "RingAttention"), with its mistakes fixed, each marked FIX. Weights are slices of a dense ts.TransformerBlock.

_gather = getattr(funcol, "all_gather_single_autograd", getattr(funcol, "all_gather_tensor_autograd", None))
_reduce_scatter = getattr(funcol, "reduce_scatter_single_autograd",
                          getattr(funcol, "reduce_scatter_tensor_autograd", None))


class SequenceParallelismLayerNorm(nn.Module):
    def __init__(self, dense: nn.LayerNorm):
        super().__init__()
        self.eps = dense.eps
        self.alpha = nn.Parameter(dense.weight.detach().clone())  # FIX: the dense weights, not torch.randn
        self.beta = nn.Parameter(dense.bias.detach().clone())

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)  # FIX: biased variance, as LayerNorm
        return self.alpha * (x - mean) / torch.sqrt(var + self.eps) + self.beta  # FIX: the square root


class ColumnParallelism(nn.Module):
    """y = x W_r^T + b_r, with this rank's rows (output features) of the dense layer."""

    def __init__(self, dense: nn.Linear, rows: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(dense.weight.detach()[rows].clone())  # FIX: a slice of the dense weight
        self.bias = nn.Parameter(dense.bias.detach()[rows].clone())

    def forward(self, x):
        return x @ self.weight.T + self.bias


class RowParallelism(nn.Module):
    """Partial sums x_r W_r^T; the reduction is the block's reduce-scatter, the bias added after it."""

    def __init__(self, dense: nn.Linear, cols: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(dense.weight.detach()[:, cols].clone())
        self.bias = nn.Parameter(dense.bias.detach().clone())

    def forward(self, x):
        return x @ self.weight.T  # FIX: no all_reduce here (tp_to_sp reduce-scatters), bias after the reduction


class TPAttentionLayer(nn.Module):
    def __init__(self, dense, rank, world_size):
        super().__init__()
        heads, d = dense.attn.qkv.out_features // 3, dense.d_model
        self.n_heads_per_rank, self.head_dim = dense.n_heads // world_size, d // dense.n_heads
        mine = torch.arange(rank * self.n_heads_per_rank, (rank + 1) * self.n_heads_per_rank)
        # FIX: [q | k | v] each [heads, head_dim]: this rank takes its heads from each of the three
        rows = (torch.arange(3)[:, None, None] * heads + mine[None, :, None] * self.head_dim
                + torch.arange(self.head_dim)[None, None, :]).flatten()
        self.qkv_proj = ColumnParallelism(dense.attn.qkv, rows)
        self.out_proj = RowParallelism(dense.attn.proj, (mine[:, None] * self.head_dim
                                                         + torch.arange(self.head_dim)).flatten())

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv_proj(x).reshape(b, s, 3, self.n_heads_per_rank, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / (self.head_dim ** 0.5)
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))  # FIX: causal mask
        out = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, -1)
        return self.out_proj(out)


class TPMLP(nn.Module):
    def __init__(self, dense, rank, world_size):
        super().__init__()
        per_rank = dense.d_ff // world_size
        mine = torch.arange(rank * per_rank, (rank + 1) * per_rank)
        self.fc1, self.fc2 = ColumnParallelism(dense.mlp.fc1, mine), RowParallelism(dense.mlp.fc2, mine)
        self.activation = nn.GELU()

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class TPSPTransformerBlock(nn.Module):
    """Dropout is left out (p = 0): the seed's returned its input unchanged."""

    def __init__(self, dense, rank, world_size):
        super().__init__()
        self.world_size = world_size
        self.attention_layer, self.mlp = TPAttentionLayer(dense, rank, world_size), TPMLP(dense, rank, world_size)
        self.norm1, self.norm2 = SequenceParallelismLayerNorm(dense.ln1), SequenceParallelismLayerNorm(dense.ln2)

    def sp_to_tp_transition(self, x):
        return _gather(x.contiguous(), 1, dist.group.WORLD)  # FIX: differentiable (backward reduce-scatters)

    def tp_to_sp_transitions(self, x):
        return _reduce_scatter(x.contiguous(), "sum", 1, dist.group.WORLD)  # FIX: reduce-scatter, not gather + chunk

    def forward(self, x):
        out = x + self.tp_to_sp_transitions(self.attention_layer(self.sp_to_tp_transition(self.norm1(x)))) \
            + self.attention_layer.out_proj.bias
        return out + self.tp_to_sp_transitions(self.mlp(self.sp_to_tp_transition(self.norm2(out)))) \
            + self.mlp.fc2.bias  # FIX: the MLP, not attention again

    def sync_sequence_parallel_grads(self):
        """FIX: LayerNorm weights and row biases saw only this rank's tokens: sum their gradients."""
        for p in (*self.norm1.parameters(), *self.norm2.parameters(), self.attention_layer.out_proj.bias,
                  self.mlp.fc2.bias):
            dist.all_reduce(p.grad)


@pytest.mark.parametrize("t", [2, 3])
def test_the_seeds_block_in_dist_form_equals_dense(t):
    """Forward, input gradient and every weight gradient equal the dense block's; the block's calls are the
    package's TP+SP block's less the two backward re-gathers (autograd saves the gathered input)."""
    b, s, h, heads = 2, 6 * t, 24, 6
    torch.manual_seed(0)
    dense = ts.TransformerBlock(h, heads, d_ff=36).double()
    with torch.no_grad():
        for ln in (dense.ln1, dense.ln2):
            ln.weight.normal_(), ln.bias.normal_()
    x, gy = randn(b, s, h, seed=1), randn(b, s, h, seed=2)
    xd = x.clone().requires_grad_()
    dense(xd).backward(gy)

    def fn(comm):
        r = dist.get_rank()
        block = TPSPTransformerBlock(dense, r, t)
        xi = x.chunk(t, 1)[r].clone().requires_grad_()
        with comm.scope("block"):
            y = block(xi)
            y.backward(gy.chunk(t, 1)[r])
        with comm.phase("grad_sync"):
            block.sync_sequence_parallel_grads()
        return y.detach(), xi.grad, block

    res = ts.run(fn, world_size=t, torch_distributed=True)
    assert max_diff(torch.cat([o[0] for o in res.outputs], 1), dense(x).detach()) <= TOL
    assert max_diff(torch.cat([o[1] for o in res.outputs], 1), xd.grad) <= TOL
    blocks = [o[2] for o in res.outputs]
    for r, blk in enumerate(blocks):
        assert max_diff(blk.norm1.alpha.grad, dense.ln1.weight.grad) <= TOL
        assert max_diff(blk.norm2.beta.grad, dense.ln2.bias.grad) <= TOL
        assert max_diff(blk.mlp.fc2.bias.grad, dense.mlp.fc2.bias.grad) <= TOL
    fc1 = torch.cat([blk.mlp.fc1.weight.grad for blk in blocks])
    fc2 = torch.cat([blk.mlp.fc2.weight.grad for blk in blocks], 1)
    qkv = torch.cat([blk.attention_layer.qkv_proj.weight.grad.view(3, -1, h) for blk in blocks], 1).view(-1, h)
    proj = torch.cat([blk.attention_layer.out_proj.weight.grad for blk in blocks], 1)
    for got, want in ((fc1, dense.mlp.fc1.weight), (fc2, dense.mlp.fc2.weight), (qkv, dense.attn.qkv.weight),
                      (proj, dense.attn.proj.weight)):
        assert max_diff(got, want.grad) <= TOL

    ours, theirs = block_events(res.trace, scope="block"), package_block_events(dense, x, gy, t)
    shard = b * s // t * h * 8
    assert ours == [("all_gather", "forward", shard), ("reduce_scatter", "forward", shard * t)] * 2 \
        + [("all_gather", "backward", shard), ("reduce_scatter", "backward", shard * t)] * 2
    regathers = [("all_gather", "backward", shard)] * 2
    assert sorted(ours + regathers) == sorted(theirs)


class RingAttention(nn.Module):
    """The seed's ring attention on this rank's contiguous block of q, k, v ([b, heads, s/p, d]), causal.

    Forward only: its backward needs a second ring carrying dK/dV home, in an autograd Function of its
    own (the package's ``ts.ring_attention`` has one)."""

    def __init__(self, rank, world_size):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    def forward(self, q, k, v):
        p, r = self.world_size, self.rank
        m = torch.full((*q.shape[:-1], 1), float("-inf"), dtype=q.dtype)
        d, o = torch.zeros_like(m), torch.zeros_like(q)
        for step in range(p):  # FIX: p steps (every K/V block, this rank's own included), not p - 1
            src = (r - step) % p
            if step < p - 1:  # FIX: post the shift before computing, batched so no fabric can hang on its order
                k_next, v_next, works = self.ring_exchange(k, v)
            if src <= r:  # FIX: causal. Blocks from later ranks are all masked; the own block is the diagonal
                scores = q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5)  # FIX: the received k (k is the current block)
                if src == r:
                    scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
                m, d, o = self._online_softmax(m, d, o, scores, v)
            if step < p - 1:
                for work in works:
                    work.wait()
                k, v = k_next, v_next
        return o / d

    def _online_softmax(self, m_prev, d_prev, o_prev, scores, v):
        m_new = torch.maximum(m_prev, scores.amax(dim=-1, keepdim=True))  # FIX: .values, not .values()
        e = torch.exp(scores - m_new)
        scale = torch.exp(m_prev - m_new)  # 0 for the first block (m_prev = -inf, m_new finite)
        return m_new, d_prev * scale + e.sum(-1, keepdim=True), o_prev * scale + e @ v  # FIX: unnormalised o

    def ring_exchange(self, k, v):
        send_rank, recv_rank = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        k_recv, v_recv = torch.empty_like(k), torch.empty_like(v)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, k, send_rank), dist.P2POp(dist.isend, v, send_rank),
                                        dist.P2POp(dist.irecv, k_recv, recv_rank),
                                        dist.P2POp(dist.irecv, v_recv, recv_rank)])
        return k_recv, v_recv, works


@pytest.mark.parametrize("p", [2, 3, 4])
def test_the_seeds_ring_attention_in_dist_form_equals_dense_causal_attention(p):
    """Exact against dense causal attention; each rank sends p − 1 K/V blocks: 2(p−1)·b·heads·(s/p)·d·8 bytes."""
    b, heads, s, d = 2, 3, 5 * p, 4
    q, k, v = (randn(b, heads, s, d, seed=i) for i in range(3))

    def fn(comm):
        r = dist.get_rank()
        with comm.scope("ring"):
            return RingAttention(r, p)(*(z.chunk(p, 2)[r] for z in (q, k, v)))

    res = ts.run(fn, world_size=p, torch_distributed=True)
    assert max_diff(torch.cat(res.outputs, 2), ts.dense_attention(q, k, v, causal=True)) <= TOL
    for rank in range(p):
        assert res.trace.total("sent_bytes", rank=rank, op="send") == 2 * (p - 1) * b * heads * (s // p) * d * 8


# ---- DTensor: parallelize_module with PyTorch's own TP+SP plan --------------------------------------

def make_llama(h=48, heads=12, kv=6, d_ff=36):
    torch.manual_seed(0)
    block = ts.LlamaBlock(h, heads, kv, d_ff=d_ff).double()
    with torch.no_grad():
        block.ln1.weight.add_(0.3 * torch.randn(h, dtype=torch.float64))
        block.ln2.weight.add_(0.3 * torch.randn(h, dtype=torch.float64))
    return block


@pytest.mark.parametrize("t, kv, s", [(2, 6, 10), (3, 3, 9)])
def test_dtensor_tp_sp_llama_block_equals_dense_and_the_packages_bytes(t, kv, s):
    from tpsp_sim.torch_api.plans import llama_tp_sp_plan

    b, h = 2, 48
    dense = make_llama(kv=kv)
    x, gy = randn(b, s, h, seed=1), randn(b, s, h, seed=2)
    xd = x.clone().requires_grad_()
    dense(xd).backward(gy)

    def fn(comm):
        r = dist.get_rank()
        mesh = init_device_mesh("cpu", (t,), mesh_dim_names=("tp",))
        block = parallelize_module(copy.deepcopy(dense), mesh, llama_tp_sp_plan())
        xi = x.chunk(t, 1)[r].clone().requires_grad_()
        with comm.scope("block"):
            y = block(xi)
            y.backward(gy.chunk(t, 1)[r])
        with comm.phase("grad_sync"):
            grads = {n: p.grad.full_tensor() for n, p in block.named_parameters()}
        return y, xi.grad, grads

    res = ts.run(fn, world_size=t, torch_distributed=True)
    assert max_diff(torch.cat([o[0].detach() for o in res.outputs], 1), dense(x).detach()) <= TOL
    assert max_diff(torch.cat([o[1] for o in res.outputs], 1), xd.grad) <= TOL
    for _, _, grads in res.outputs:
        for name, p in dense.named_parameters():
            assert max_diff(grads[name], p.grad) <= TOL, name
    assert not any(isinstance(o[0], DTensor) for o in res.outputs)  # the block hands back local shards

    ours, theirs = block_events(res.trace, scope="block"), package_block_events(dense, x, gy, t)
    shard = b * s // t * h * 8
    forward = [("all_gather", "forward", shard), ("reduce_scatter", "forward", shard * t)] * 2
    assert [e for e in ours if e[1] == "forward"] == [e for e in theirs if e[1] == "forward"] == forward
    # backward: the package gathers each sublayer's input again for its weight gradient (Megatron keeps the shard)
    assert [e for e in ours if e[1] == "backward"] == [("all_gather", "backward", shard),
                                                      ("reduce_scatter", "backward", shard * t)] * 2
    assert sorted(e for e in theirs if e[1] == "backward") == sorted(
        [("all_gather", "backward", shard)] * 4 + [("reduce_scatter", "backward", shard * t)] * 2)


# ---- FSDP2: fully_shard on the tiny Llama ---------------------------------------------------------

@pytest.mark.parametrize("p", [2, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_fsdp2_tiny_llama_equals_dense_and_moves_the_zero3_bytes(p):
    """Per rank and step, ZeRO-3 moves 3Ψ(p−1)/p (ZeRO paper §7: all-gather in forward, again in backward,
    reduce-scatter of the gradients), Ψ the parameter bytes, each parameter's dim 0 padded to a multiple
    of p. FSDP2 keeps the root module's parameters (embedding, final norm, head) gathered from forward to
    backward, so it gathers those once: 3Ψ(p−1)/p − Ψ_root(p−1)/p."""
    vocab, h, heads = 30, 16, 4
    torch.manual_seed(0)
    model = ts.TinyLlama(vocab, h, 2, heads, d_ff=24).double()
    tokens, targets = torch.randint(0, vocab, (2 * p, 5)), torch.randint(0, vocab, (2 * p, 5))
    reference = copy.deepcopy(model)
    reference.loss(tokens, targets).backward()  # the mean over the whole batch = the mean of the p equal shards' means

    def fn(comm):
        r = dist.get_rank()
        mesh = init_device_mesh("cpu", (p,), mesh_dim_names=("dp",))
        sharded = copy.deepcopy(model)
        for block in sharded.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        with comm.scope("step"):
            sharded.loss(tokens[2 * r:2 * r + 2], targets[2 * r:2 * r + 2]).backward()
        with comm.phase("grad_sync"):
            return {n: q.grad.full_tensor() for n, q in sharded.named_parameters()}

    res = ts.run(fn, world_size=p, torch_distributed=True)
    for grads in res.outputs:
        for name, q in reference.named_parameters():
            assert max_diff(grads[name], q.grad) <= TOL, name

    def padded_bytes(params):  # FSDP2 shards each parameter's dim 0 in p chunks, padding it to a multiple of p
        return sum(math.ceil(q.shape[0] / p) * p * q[0].numel() * 8 for q in params)

    blocks = [padded_bytes(block.parameters()) for block in model.blocks]
    root = padded_bytes(q for n, q in model.named_parameters() if not n.startswith("blocks."))
    psi = sum(blocks) + root
    for rank in range(p):
        sent = res.trace.total("sent_bytes", rank=rank, scope="step")
        assert sent == (3 * psi - root) * (p - 1) // p
        assert res.trace.total("sent_bytes", rank=rank, scope="step", op="reduce_scatter") == psi * (p - 1) // p
    assert {e.axis for e in res.trace.events if e.scope == "step"} == {None}  # a 1-D mesh is the default group


def test_the_readme_example_runs():
    from pathlib import Path
    import re
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "torch_distributed=True" in b]
    exec(compile("import torch\nimport tpsp_sim as ts\n" + block, "README.md", "exec"), {})


def test_torchs_context_parallel_has_no_cpu_ring():
    """Pins the README's statement: torch's context_parallel rings only the CUDA SDPA kernels (flash,
    memory-efficient, cuDNN); the CPU kernel has no sharding rule. If torch adds one, this fails: test it then."""
    from torch.distributed.tensor.experimental import context_parallel

    q, k, v = (randn(1, 2, 8, 4, seed=s) for s in range(3))

    def fn(comm):
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
        buffers = [q.clone(), k.clone(), v.clone()]  # sharded over the sequence in place
        with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2]):
            F.scaled_dot_product_attention(*buffers, is_causal=True)

    with pytest.raises(NotImplementedError, match="_scaled_dot_product_flash_attention_for_cpu"):
        ts.run(fn, world_size=2, torch_distributed=True)


@pytest.mark.parametrize("p", [2, 3])
def test_ddp_equals_dense_and_all_reduces_the_gradients_once(p):
    """DistributedDataParallel (its C++ reducer calls the group): the mean of the replicas' gradients equals the
    dense gradient of the batch mean; backward all-reduces the Ψ gradient bytes once, 2Ψ(p−1)/p per rank
    (one bucket: Ψ under DDP's 25 MB cap); at construction it broadcasts the parameters from rank 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    x = randn(2 * p, 4, seed=3)
    reference = copy.deepcopy(model)
    reference(x).mean().backward()

    def fn(comm):
        r = dist.get_rank()
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
        with comm.scope("step"):
            ddp(x.chunk(p)[r]).mean().backward()
        return {n: q.grad for n, q in ddp.module.named_parameters()}

    res = ts.run(fn, world_size=p, torch_distributed=True)
    for grads in res.outputs:
        for name, q in reference.named_parameters():
            assert max_diff(grads[name], q.grad) <= TOL, name
    psi = sum(q.numel() for q in model.parameters()) * 8
    assert [(e.op, e.phase) for e in res.trace.events if e.rank == 0 and e.scope == "step"] == [("all_reduce", "backward")]
    assert res.trace.total("sent_bytes", rank=0, scope="step") == 2 * psi * (p - 1) // p
    # the root sends every parameter once (besides, DDP checks the parameter shapes: int64 collectives)
    assert res.trace.total("sent_bytes", rank=0, op="broadcast", dtype=torch.float64) == psi


@pytest.mark.parametrize("schedule", ["ScheduleGPipe", "Schedule1F1B"])
def test_torch_pipelining_equals_dense_and_sends_each_micro_batch_once_each_way(schedule):
    """torch.distributed.pipelining, 2 stages, 4 micro-batches: the gradients are the dense ones divided by the
    micro-batch count (its default scale_grads), and each micro-batch's activation goes forward once and its
    gradient back once (float64 messages; the shape handshake of the first step adds int64 / uint8 ones)."""
    import torch.distributed.pipelining as pipelining

    torch.manual_seed(0)
    layers = [nn.Linear(4, 4).double() for _ in range(2)]
    x, target = randn(8, 4, seed=4), randn(8, 4, seed=5)
    loss_fn = lambda y, t: ((y - t) ** 2).sum()  # noqa: E731
    reference = nn.Sequential(*copy.deepcopy(layers))
    loss_fn(reference(x), target).backward()

    def fn(comm):
        r = dist.get_rank()
        stage = pipelining.PipelineStage(copy.deepcopy(layers[r]), r, 2, torch.device("cpu"))
        step = getattr(pipelining, schedule)(stage, n_microbatches=4, loss_fn=loss_fn)
        losses = []
        if r == 0:
            step.step(x)
        else:
            step.step(target=target, losses=losses)
        return stage.submod.weight.grad, losses

    res = ts.run(fn, world_size=2, torch_distributed=True)
    for r, (grad, _) in enumerate(res.outputs):
        assert max_diff(grad, reference[r].weight.grad / 4) <= TOL
    assert abs(sum(res.outputs[1][1]).item() - loss_fn(reference(x), target).item()) <= TOL
    micro = 2 * 4 * 8  # one micro-batch of 2 rows, 4 features, float64
    for rank in (0, 1):
        sends = [e for e in res.trace.events if e.rank == rank and e.op == "send" and e.dtype == torch.float64]
        assert [(e.peer, e.sent_bytes) for e in sends] == [(1 - rank, micro)] * 4
