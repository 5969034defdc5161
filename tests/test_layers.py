"""Column/row parallel linears, SP gradient sync and dropout, each against a dense nn.Linear in float64."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import seeded_randn
import tpsp_sim as ts

TOL = 1e-10
WORLD_SIZES = [1, 2, 3, 4]


def dense_linear(n_in, n_out, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias).double()


def randn(*shape, seed=1):
    return seeded_randn(shape, seed=seed)[0]


def dense_run(linear, x, gy):
    x = x.clone().requires_grad_()
    y = linear(x)
    y.backward(gy)
    return y.detach(), x.grad, {n: p.grad for n, p in linear.named_parameters()}


def features_of_rank(y, r, t, stride):
    """Rank r's output features: chunk r of each of the `stride` blocks (written out for stride 1 and 3)."""
    return torch.cat([block.chunk(t, -1)[r] for block in y.chunk(stride, -1)], -1)


def assert_close(a, b):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= TOL


# ---- slicing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", WORLD_SIZES)
def test_weights_are_owned_exact_slices_of_the_dense_layer(t):
    qkv, proj = dense_linear(8, 3 * 12), dense_linear(12, 8)

    def fn(comm):
        col = ts.ColumnParallelLinear.from_dense(qkv, comm, stride=3)
        row = ts.RowParallelLinear.from_dense(proj, comm)
        return col.weight, col.bias, row.weight, row.bias

    outs = ts.run(fn, world_size=t).outputs
    for r, (cw, cb, rw, rb) in enumerate(outs):
        q, k, v = qkv.weight.detach().chunk(3, 0)
        assert torch.equal(cw, torch.cat([q.chunk(t, 0)[r], k.chunk(t, 0)[r], v.chunk(t, 0)[r]]))
        assert torch.equal(cb, features_of_rank(qkv.bias.detach(), r, t, 3))
        assert torch.equal(rw, proj.weight.detach().chunk(t, 1)[r])
        assert torch.equal(rb, proj.bias.detach())
        assert isinstance(cw, nn.Parameter) and (cw.partition_dim, cw.partition_stride) == (0, 3)
        assert rw.partition_dim == 1 and rb.partition_dim is None
    storages = [x.untyped_storage().data_ptr() for out in outs for x in out]
    storages += [p.untyped_storage().data_ptr() for p in (*qkv.parameters(), *proj.parameters())]
    assert len(set(storages)) == len(storages), "every rank owns copies; nothing aliases the dense layer"


# ---- column and row layers against nn.Linear ----------------------------------------------------

@pytest.mark.parametrize("t", WORLD_SIZES)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("gather_output", [False, True], ids=["", "gather"])
@pytest.mark.parametrize("stride", [1, 3])
def test_column_parallel_linear_equals_dense(t, sp, gather_output, stride):
    b, s, n_in, n_out = 2, 12, 5, 3 * 4 * t
    linear = dense_linear(n_in, n_out)
    x, gy = randn(b, s, n_in), randn(b, s, n_out, seed=2)
    y, gx, grads = dense_run(linear, x, gy)

    def fn(comm):
        r = comm.rank
        layer = ts.ColumnParallelLinear.from_dense(linear, comm, sequence_parallel=sp, gather_output=gather_output,
                                                   stride=stride)
        xi = (x.chunk(t, 1)[r] if sp else x).clone().requires_grad_()
        yi = layer(xi)
        # each rank's loss is its own features' part of sum(y * gy); with gather_output every rank
        # sees all features, and gather's backward keeps its own part of the gradient
        yi.backward(gy if gather_output else features_of_rank(gy, r, t, stride))
        return yi.detach(), xi.grad, ts.gather_dense_grads(layer)

    res = ts.run(fn, world_size=t)
    for r, (yi, gxi, dense_grads) in enumerate(res.outputs):
        assert_close(yi, y if gather_output else features_of_rank(y, r, t, stride))
        assert_close(gxi, gx.chunk(t, 1)[r] if sp else gx)
        assert dense_grads.keys() == grads.keys()
        for name in grads:
            assert_close(dense_grads[name], grads[name])


@pytest.mark.parametrize("t", WORLD_SIZES)
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_row_parallel_linear_equals_dense_and_adds_its_bias_once(t, sp):
    b, s, n_in, n_out = 2, 12, 4 * t, 5
    linear = dense_linear(n_in, n_out)
    with torch.no_grad():
        linear.bias.fill_(100.0)  # added t times instead of once, this could not pass
    x, gy = randn(b, s, n_in), randn(b, s, n_out, seed=2)
    y, gx, grads = dense_run(linear, x, gy)

    def fn(comm):
        r = comm.rank
        layer = ts.RowParallelLinear.from_dense(linear, comm, sequence_parallel=sp)
        xi = x.chunk(t, -1)[r].clone().requires_grad_()
        yi = layer(xi)
        yi.backward(gy.chunk(t, 1)[r] if sp else gy)  # without SP the output is whole on every rank
        if sp:
            ts.sync_sequence_parallel_grads(layer, comm)  # the bias saw only this rank's tokens
        return yi.detach(), xi.grad, ts.gather_dense_grads(layer)

    res = ts.run(fn, world_size=t)
    for r, (yi, gxi, dense_grads) in enumerate(res.outputs):
        assert_close(yi, y.chunk(t, 1)[r] if sp else y)
        assert_close(gxi, gx.chunk(t, -1)[r])
        assert_close(dense_grads["weight"], grads["weight"])
        assert_close(dense_grads["bias"], grads["bias"])


@settings(max_examples=12, deadline=None)
@given(t=st.sampled_from([1, 2, 3, 4]), sp=st.booleans(), b=st.integers(1, 3), s_per_rank=st.integers(1, 3),
       n_in=st.integers(1, 6), hidden_per_rank=st.integers(1, 3), bias=st.booleans())
def test_column_then_row_equals_dense_mlp(t, sp, b, s_per_rank, n_in, hidden_per_rank, bias):
    s, hidden = s_per_rank * t, hidden_per_rank * t
    fc1, fc2 = dense_linear(n_in, hidden, 0, bias), dense_linear(hidden, n_in, 1, bias)
    x, gy = randn(b, s, n_in, seed=3), randn(b, s, n_in, seed=4)
    xd = x.clone().requires_grad_()
    y = fc2(torch.tanh(fc1(xd)))
    y.backward(gy)

    def fn(comm):
        col = ts.ColumnParallelLinear.from_dense(fc1, comm, sequence_parallel=sp)
        row = ts.RowParallelLinear.from_dense(fc2, comm, sequence_parallel=sp)
        xi = (x.chunk(t, 1)[comm.rank] if sp else x).clone().requires_grad_()
        yi = row(torch.tanh(col(xi)))
        yi.backward(gy.chunk(t, 1)[comm.rank] if sp else gy)
        return yi.detach(), xi.grad

    res = ts.run(fn, world_size=t)
    join = (lambda xs: torch.cat(xs, 1)) if sp else (lambda xs: xs[0])
    assert_close(join([o[0] for o in res.outputs]), y.detach())
    assert_close(join([o[1] for o in res.outputs]), xd.grad)


# ---- what the sequence-parallel column layer saves, and what it communicates ----------------------

@pytest.mark.parametrize("t", [2, 4])
def test_sequence_parallel_column_saves_only_the_input_shard_and_regathers_it(t):
    b, s, n_in = 2, 8, 6
    linear = dense_linear(n_in, 4 * t)
    x = randn(b, s, n_in)

    def fn(comm, sp):
        layer = ts.ColumnParallelLinear.from_dense(linear, comm, sequence_parallel=sp)
        xi = (x.chunk(t, 1)[comm.rank] if sp else x).clone().requires_grad_()
        with ts.saved_tensor_meter(exclude=layer.parameters()) as meter:
            y = layer(xi)
        y.sum().backward()
        return meter.nbytes

    full = b * s * n_in * 8
    sp = ts.run(fn, True, world_size=t)
    assert sp.outputs == [full // t] * t
    assert ts.run(fn, False, world_size=t).outputs == [full] * t
    for r in range(t):
        assert [(e.op, e.phase, e.shape) for e in sp.trace.filter(rank=r).events] == [
            ("all_gather", "forward", (b, s // t, n_in)), ("all_gather", "backward", (b, s // t, n_in)),
            ("reduce_scatter", "backward", (b, s, n_in))]


# ---- sequence-parallel gradients ------------------------------------------------------------------

@pytest.mark.parametrize("t", [2, 3, 4])
def test_sync_sums_the_layernorm_gradients_that_each_rank_holds_a_part_of(t):
    ln = nn.LayerNorm(6).double()
    with torch.no_grad():
        ln.weight.copy_(randn(6, seed=5))
    x, gy = randn(2, 3 * t, 6), randn(2, 3 * t, 6, seed=2)
    ln(x).backward(gy)

    def fn(comm, sync):
        local = ts.replicate(ln, sequence_parallel=True)
        r = comm.rank
        local(x.chunk(t, 1)[r]).backward(gy.chunk(t, 1)[r])
        if sync:
            ts.sync_sequence_parallel_grads(local, comm)
        return ts.gather_dense_grads(local, comm)

    for grads in ts.run(fn, True, world_size=t).outputs:
        assert_close(grads["weight"], ln.weight.grad)
        assert_close(grads["bias"], ln.bias.grad)
    with pytest.raises(ValueError, match="differs between ranks.*sync_sequence_parallel_grads"):
        ts.run(fn, False, world_size=t)


def test_gather_dense_grads_needs_a_comm():
    with pytest.raises(ValueError, match="pass comm="):
        ts.gather_dense_grads(nn.Linear(2, 2))


# ---- dropout ------------------------------------------------------------------------------------

def test_dropout_zeroes_and_rescales_and_is_identity_in_eval():
    drop = ts.Dropout(0.25, ts.DropoutRNG(seed=0))
    x = torch.rand(64, 64, dtype=torch.float64) + 1
    y = drop(x)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.75, rtol=1e-15, atol=0)
    assert abs(kept.double().mean().item() - 0.75) < 0.02
    assert drop.eval()(x) is x
    with pytest.raises(ValueError, match="got 1.0"):
        ts.Dropout(1.0, ts.DropoutRNG())


def test_dropout_saves_only_a_one_byte_mask():
    x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    with ts.saved_tensor_meter() as meter:
        ts.Dropout(0.5, ts.DropoutRNG(seed=0))(x)
    assert meter.nbytes == x.numel()


@pytest.mark.parametrize("t", [2, 3, 4])
def test_dropout_masks_per_rank_shared_and_exact(t):
    shape = (2, 4 * t, 6)
    full = ts.DropoutRNG(seed=7).keep_mask(torch.empty(shape), 0.5, None)
    shard = torch.empty(2, 4, 6)

    def fn(comm):
        own, exact = ts.DropoutRNG(7, comm), ts.DropoutRNG(7, comm, exact=True)
        return own.keep_mask(shard, 0.5, 1), own.keep_mask(torch.empty(shape), 0.5, None), exact.keep_mask(shard, 0.5, 1)

    outs = ts.run(fn, world_size=t).outputs
    for r, (own, shared, exact) in enumerate(outs):
        assert own.dtype == torch.bool
        assert torch.equal(shared, full), "masks of whole (replicated) tensors are the same on every rank"
        assert torch.equal(exact, full.chunk(t, 1)[r]), "exact mode slices the dense mask"
        for other in outs[:r]:
            assert not torch.equal(own, other[0]), "sequence shards must not repeat one mask"
    with pytest.raises(ValueError, match="needs a seed"):
        ts.run(lambda comm: ts.DropoutRNG(None, comm), world_size=1)


# ---- sizes that do not divide -------------------------------------------------------------------

def test_sizes_that_do_not_divide_raise_value_errors_with_the_numbers():
    def column(comm):
        ts.ColumnParallelLinear.from_dense(nn.Linear(4, 10), comm)

    def qkv(comm):
        ts.ColumnParallelLinear.from_dense(nn.Linear(4, 3 * 4), comm, stride=3)

    def row(comm):
        ts.RowParallelLinear.from_dense(nn.Linear(6, 4), comm)

    with pytest.raises(ValueError, match=r"rank \d: cannot split size 10 of dim 0 .* into 4 ranks x 1"):
        ts.run(column, world_size=4)
    with pytest.raises(ValueError, match=r"size 12 of dim 0 .* into 8 ranks x 3"):
        ts.run(qkv, world_size=8)
    with pytest.raises(ValueError, match=r"size 6 of dim 1 .* into 4 ranks"):
        ts.run(row, world_size=4)
