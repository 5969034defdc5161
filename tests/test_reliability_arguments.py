"""Issue 24 item 7: every rank gets its own copy of the tensors among ts.run's arguments, as each process
of a real backend unpickles its own: an in-place change or a gradient never reaches another rank or the caller."""

import pytest
import torch

import tpsp_sim as ts


def scales_its_x_in_place(comm, x, pieces):
    x.mul_(10 ** comm.rank)  # rank r scales its x by 10^r
    (pieces["w"] * (comm.rank + 1)).sum().backward()
    return x, pieces["w"].grad


@pytest.mark.parametrize("backend", ["sim", pytest.param("gloo", marks=[pytest.mark.real, pytest.mark.timeout(120)])])
def test_an_in_place_change_or_a_gradient_on_one_rank_reaches_no_other_rank_nor_the_caller(backend):
    x = torch.ones(3)
    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    res = ts.run(scales_its_x_in_place, x, {"w": w}, world_size=3, backend=backend)
    assert [out[0].tolist() for out in res.outputs] == [[1.0] * 3, [10.0] * 3, [100.0] * 3]
    assert [out[1].tolist() for out in res.outputs] == [[1.0] * 2, [2.0] * 2, [3.0] * 2]  # not summed over ranks
    assert x.tolist() == [1.0] * 3 and w.grad is None


def test_copies_keep_views_parameters_and_containers():
    base = torch.arange(6.0)
    param = torch.nn.Parameter(torch.zeros(2))
    point = torch.return_types.max((torch.ones(1), torch.zeros(1, dtype=torch.long)))

    def fn(comm, whole, first_half, p, named):
        first_half.add_(comm.rank + 1)  # a view of whole, in this rank's copy as in the caller's
        return whole, type(p), p.requires_grad, type(named), named.values

    res = ts.run(fn, base, base[:3], param, point, world_size=2)
    assert [out[0].tolist() for out in res.outputs] == [[1, 2, 3, 3, 4, 5], [2, 3, 4, 3, 4, 5]]
    assert all(out[1:4] == (torch.nn.Parameter, True, torch.return_types.max) for out in res.outputs)
    assert res.outputs[0][4] is not point.values
    assert base.tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("backend", ["sim", "gloo"])  # refused before any process starts
def test_a_tensor_with_autograd_history_is_a_value_error_on_every_backend(backend):
    x = torch.ones(2, requires_grad=True) * 2
    with pytest.raises(ValueError, match=r"an argument is a tensor with autograd history \(shape \(2,\), "
                                         r"grad_fn=MulBackward0\).*pass x.detach\(\)"):
        ts.run(len, [{"x": x}], world_size=2, backend=backend)


def gathers_on_a_group_given_out_of_order(comm):
    group = comm.new_group([2, 0])
    if group is None:
        return None
    return group.rank, group.group, group.all_gather(torch.tensor([float(comm.rank)])).tolist()


@pytest.mark.parametrize("backend", ["sim", pytest.param("gloo", marks=[pytest.mark.real, pytest.mark.timeout(120)])])
def test_new_group_sorts_its_ranks_as_torch_does(backend):
    """Issue 24 item 8: the simulator kept the order given; torch.distributed sorts."""
    outputs = ts.run(gathers_on_a_group_given_out_of_order, world_size=3, backend=backend).outputs
    assert outputs == [(0, (0, 2), [0.0, 2.0]), None, (1, (0, 2), [0.0, 2.0])]
