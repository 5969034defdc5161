"""Gradients through every differentiable collective equal the dense computation (float64), and the
backward collective is recorded with phase "backward" under the forward's scope."""

import pytest
import torch

import tpsp_sim as ts
from tpsp_sim import mappings as M

P = [1, 2, 3, 4]


def dense_and_parallel(p, mapping, emulate, in_shape, replicated_input=False, replicated_output=False):
    """Compare the per-rank mapping with a dense emulation of all ranks in one autograd graph.

    ``emulate(xs) -> ys`` computes every rank's output from every rank's input with plain torch ops.
    Each rank's loss is (y_r * w_r).sum(); a replicated output is one tensor shared by all ranks,
    so its loss counts once (every rank uses the same w) — Megatron's convention for f̄.
    """
    g = torch.Generator().manual_seed(p)
    xs = [torch.randn(in_shape, generator=g, dtype=torch.float64) for _ in range(p)]
    if replicated_input:
        xs = [xs[0].clone() for _ in range(p)]
    ys_shape = emulate([x.clone() for x in xs])[0].shape
    ws = [torch.randn(ys_shape, generator=g, dtype=torch.float64) for _ in range(p)]
    if replicated_output:
        ws = [ws[0].clone() for _ in range(p)]

    leaves = [xs[0].clone().requires_grad_()] * p if replicated_input else [x.clone().requires_grad_() for x in xs]
    ys = emulate(leaves)
    loss = (ys[0] * ws[0]).sum() if replicated_output else sum((y * w).sum() for y, w in zip(ys, ws))
    loss.backward()

    def fn(comm, xs, ws):
        x = xs[comm.rank].clone().requires_grad_()
        with comm.scope("layer"):
            y = mapping(x, comm)
        (y * ws[comm.rank]).sum().backward()
        return y.detach(), x.grad

    res = ts.run(fn, xs, ws, world_size=p)
    for r, (y, grad) in enumerate(res.outputs):
        torch.testing.assert_close(y, ys[r].detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(grad, leaves[r].grad, rtol=0, atol=1e-12)
    return res.trace


@pytest.mark.parametrize("p", P)
def test_f_is_identity_forward_all_reduce_backward(p):
    trace = dense_and_parallel(p, M.f, lambda xs: list(xs), (3, 4), replicated_input=True)
    assert trace.ops(phase="forward") == {}
    assert trace.ops(phase="backward", scope="layer") == {"all_reduce": p}


@pytest.mark.parametrize("p", P)
def test_f_bar_is_all_reduce_forward_identity_backward(p):
    trace = dense_and_parallel(p, M.f_bar, lambda xs: [sum(xs)] * len(xs), (3, 4), replicated_output=True)
    assert trace.ops(phase="forward", scope="layer") == {"all_reduce": p}
    assert trace.ops(phase="backward") == {}


@pytest.mark.parametrize("p", P)
@pytest.mark.parametrize("dim", [0, 1])
def test_g_is_all_gather_forward_reduce_scatter_backward(p, dim):
    mapping = lambda x, comm: M.g(x, comm, dim=dim)  # noqa: E731
    trace = dense_and_parallel(p, mapping, lambda xs: [torch.cat(xs, dim)] * len(xs), (2, 3))
    assert trace.ops(phase="forward", scope="layer") == {"all_gather": p}
    assert trace.ops(phase="backward", scope="layer") == {"reduce_scatter": p}


@pytest.mark.parametrize("p", P)
@pytest.mark.parametrize("dim", [0, 1])
def test_g_bar_is_reduce_scatter_forward_all_gather_backward(p, dim):
    shape = (2 * p, 3) if dim == 0 else (2, 3 * p)
    mapping = lambda x, comm: M.g_bar(x, comm, dim=dim)  # noqa: E731
    trace = dense_and_parallel(p, mapping, lambda xs: list(sum(xs).chunk(len(xs), dim)), shape)
    assert trace.ops(phase="forward", scope="layer") == {"reduce_scatter": p}
    assert trace.ops(phase="backward", scope="layer") == {"all_gather": p}


@pytest.mark.parametrize("p", P)
def test_split_keeps_a_chunk_forward_and_all_gathers_backward(p):
    trace = dense_and_parallel(p, M.split_to_region, lambda xs: list(xs[0].chunk(len(xs), -1)), (3, 2 * p),
                               replicated_input=True)
    assert trace.ops(phase="forward") == {}
    assert trace.ops(phase="backward", scope="layer") == {"all_gather": p}


@pytest.mark.parametrize("p", P)
def test_gather_from_region_all_gathers_forward_and_splits_backward(p):
    trace = dense_and_parallel(p, M.gather_from_region, lambda xs: [torch.cat(xs, -1)] * len(xs), (3, 2),
                               replicated_output=True)
    assert trace.ops(phase="forward", scope="layer") == {"all_gather": p}
    assert trace.ops(phase="backward") == {}


@pytest.mark.parametrize("p", P)
@pytest.mark.parametrize("scatter_dim,gather_dim", [(0, 1), (1, 0), (2, 1)])
def test_all_to_all_backward_is_the_reverse_all_to_all(p, scatter_dim, gather_dim):
    def emulate(xs):
        return [torch.cat([x.chunk(len(xs), scatter_dim)[r] for x in xs], gather_dim) for r in range(len(xs))]

    mapping = lambda x, comm: M.all_to_all(x, comm, scatter_dim, gather_dim)  # noqa: E731
    trace = dense_and_parallel(p, mapping, emulate, (2 * p, 3 * p, p))
    assert trace.ops(phase="forward", scope="layer") == {"all_to_all": p}
    assert trace.ops(phase="backward", scope="layer") == {"all_to_all": p}


def test_backward_scope_is_the_forward_scope_even_when_backward_runs_outside_it():
    def fn(comm):
        x = torch.ones(4, 2, requires_grad=True)
        with comm.scope("block3"), comm.scope("mlp"):
            y = M.g(x, comm, dim=0)
        with comm.scope("elsewhere"):
            y.sum().backward()

    events = ts.run(fn, world_size=2).trace.filter(rank=0).events
    assert [(e.op, e.scope, e.phase) for e in events] == [
        ("all_gather", "block3/mlp", "forward"), ("reduce_scatter", "block3/mlp", "backward")]


def test_split_of_an_indivisible_dim_names_the_sizes():
    with pytest.raises(ValueError, match=r"cannot split size 5 of dim 1 \(shape \(2, 5\)\) into 2 equal chunks"):
        ts.run(lambda comm: M.split_to_region(torch.ones(2, 5), comm, dim=1), world_size=2)


class _DoubleThenSum(ts.CommFunction):
    """forward: 2x, backward: all-reduce (a new Function that writes no scope code of its own)."""

    @staticmethod
    def forward(ctx, x, comm):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * ctx.comm.all_reduce(grad), None


def test_a_new_comm_function_records_its_backward_under_the_forward_scope_by_construction():
    def fn(comm, x):
        x = x.clone().requires_grad_()
        with comm.scope("outer"), comm.scope("mine"):
            y = _DoubleThenSum.apply(x, comm)
        y.sum().backward()  # outside the scope
        return x.grad

    res = ts.run(fn, torch.ones(3, dtype=torch.float64), world_size=3)
    assert [(e.op, e.scope, e.phase) for e in res.trace.filter(rank=0).events] == [
        ("all_reduce", "outer/mine", "backward")]
    assert all(g.tolist() == [6.0] * 3 for g in res.outputs)  # 2 · (1 + 1 + 1)


def test_a_comm_function_without_a_comm_argument_says_so():
    class NoComm(ts.CommFunction):
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, grad):
            return grad

    with pytest.raises(TypeError, match="NoComm.forward needs a Comm argument"):
        NoComm.apply(torch.ones(2))
