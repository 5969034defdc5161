"""Misuse of a Comm is a ValueError (or a mismatch) naming the argument, never a wrong answer or a stray error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tpsp_sim as ts
from tpsp_sim import mappings


@pytest.mark.parametrize("call, name", [
    (lambda comm, x: comm.all_gather(x), "all_gather got dim=0"),
    (lambda comm, x: comm.reduce_scatter(x), "reduce_scatter got dim=0"),
    (lambda comm, x: comm.all_to_all(x, 0, 0), "all_to_all got scatter_dim=0"),
    (lambda comm, x: mappings.g(x, comm), "gather_from_sequence_region got dim=1"),
    (lambda comm, x: mappings.all_to_all(x, comm, 0, 0), "all_to_all got scatter_dim=0"),
])
def test_a_0d_tensor_names_the_op_and_its_shape(call, name):
    with pytest.raises(ValueError, match=rf"rank \d.*{name} for a 0-d tensor \(shape \(\)\)"):
        ts.run(lambda comm: call(comm, torch.tensor(1.0)), world_size=2)


@pytest.mark.parametrize("call, message", [
    (lambda comm, x: comm.sendrecv(x, dst=1.0, src=1), r"sendrecv: dst must be an integer rank, got 1.0 \(float\)"),
    (lambda comm, x: comm.send(x, dst="1"), r"send: dst must be an integer rank, got '1' \(str\)"),
    (lambda comm, x: comm.broadcast(x, src=True), r"broadcast: src must be an integer rank, got True \(bool\)"),
    (lambda comm, x: comm.new_group([0.5, 1]), r"new_group: every rank must be an integer rank, got 0.5 \(float\)"),
])
def test_a_rank_that_is_not_an_integer_is_named_not_truncated(call, message):
    with pytest.raises(ValueError, match=message):
        ts.run(lambda comm: call(comm, torch.ones(2)), world_size=2)


def test_integer_like_ranks_are_accepted():
    def fn(comm):
        peer = torch.tensor(1 - comm.rank)  # a 0-d integer tensor is an index
        return comm.sendrecv(torch.full((2,), float(comm.rank)), dst=peer, src=peer)

    assert [out.tolist() for out in ts.run(fn, world_size=2).outputs] == [[1.0, 1.0], [0.0, 0.0]]


def test_avg_on_one_rank_and_sum_on_another_is_a_mismatch():
    def fn(comm):
        return comm.all_reduce(torch.ones(3), op="avg" if comm.rank == 0 else "sum")

    with pytest.raises(ts.CollectiveMismatchError, match=r"op='avg'.*\n.*op='sum'"):
        ts.run(fn, world_size=2)


def test_avg_is_the_mean_on_every_rank():
    def fn(comm):
        x = torch.full((4,), float(comm.rank))
        return comm.all_reduce(x, op="avg"), comm.reduce_scatter(x, op="avg")

    for full, shard in ts.run(fn, world_size=4).outputs:
        assert full.tolist() == [1.5] * 4 and shard.tolist() == [1.5]  # (0 + 1 + 2 + 3) / 4


def test_dropout_rng_on_ranks_refuses_a_missing_seed_however_it_is_given():
    def fn(comm):
        rng = ts.DropoutRNG(seed=3, comm=comm)
        rng.manual_seed(None)

    with pytest.raises(ValueError, match=r"rank \d: a DropoutRNG on ranks needs a seed"):
        ts.run(fn, world_size=2)
    with pytest.raises(ValueError, match="needs a seed"):
        ts.run(lambda comm: ts.DropoutRNG(comm=comm), world_size=2)
    assert ts.DropoutRNG().default is None  # no comm: torch's global generator, as before


# ---- issue 24, item 10: validated up front, the same message on every backend ----------------------

@pytest.mark.parametrize("call, message", [
    (lambda comm: comm.all_reduce(torch.ones(2, dtype=torch.bool), op="avg"),
     r"rank 0 of group \(0, 1\): all_reduce: op='avg' of a bool tensor \(shape \(2,\)\) has no bool result"),
    (lambda comm: comm.reduce_scatter(torch.ones(2, dtype=torch.bool), op="avg"),
     r"reduce_scatter: op='avg' of a bool tensor"),
    (lambda comm: comm.all_gather(torch.ones(2), dim=0.0),
     r"rank 0 of group \(0, 1\): all_gather got dim=0.0 \(float\): it must be an integer dim"),
    (lambda comm: comm.all_to_all(torch.ones(2, 2), 0, "1"), r"all_to_all got gather_dim='1' \(str\)"),
    (lambda comm: comm.all_reduce([1.0, 2.0]),
     r"rank 0 of group \(0, 1\): all_reduce: x must be a torch.Tensor, got list \(\[1.0, 2.0\]\)"),
    (lambda comm: comm.all_gather(None), r"all_gather: x must be a torch.Tensor, got NoneType$"),
    (lambda comm: comm.broadcast(np.ones(2)), r"broadcast: x must be a torch.Tensor, got ndarray \(array"),
    (lambda comm: comm.recv(None, 1), r"recv: like must be a torch.Tensor, got NoneType"),
    (lambda comm: comm.sendrecv((1,), 1, 1), r"sendrecv: x must be a torch.Tensor, got tuple"),
    # the generic entry point (core/ops.py declares each op's params)
    (lambda comm: comm.collective("all_gatherr", torch.ones(2)),
     r"rank 0 of group \(0, 1\): collective: 'all_gatherr' is not a collective; collectives are \['all_gather', "),
    (lambda comm: comm.collective("send", torch.ones(2), 1), r"collective: 'send' is not a collective"),
    (lambda comm: comm.collective("barrier", torch.ones(2)),
     r"rank 0 of group \(0, 1\): barrier takes no tensor, got Tensor"),
    (lambda comm: comm.collective("all_to_all", torch.ones(2), 0),
     r"all_to_all needs gather_dim \(an integer dim of the tensor, made non-negative\)"),
    (lambda comm: comm.collective("all_gather", torch.ones(2), 0, dim=0),
     r"all_gather got dim both by position and by name"),
    (lambda comm: comm.collective("all_reduce", torch.ones(2), dims=0),
     r"all_reduce got unexpected argument\(s\) \['dims'\]; its arguments are \['op'\]"),
    (lambda comm: comm.collective("broadcast", torch.ones(2), 0, 1),
     r"broadcast takes 1 argument\(s\) after the tensor \('src',\), got 2: \(0, 1\)"),
    (lambda comm: comm.collective("reduce_scatter", torch.ones(1, 2), op="sum", dim=0),
     r"reduce_scatter: size 1 of dim=0 \(shape \(1, 2\)\) is not divisible by world_size 2"),
])
def test_bad_collective_arguments_are_a_value_error_naming_the_rank_and_op(call, message):
    def fn(comm):
        if comm.rank == 0:
            call(comm)
        comm.barrier()  # rank 1 arrives at a valid call: rank 0 is blamed, not the last to arrive

    with pytest.raises(ValueError, match=message) as info:
        ts.run(fn, world_size=2)
    assert info.value.rank == 0


def test_world_size_true_is_not_one_rank():
    with pytest.raises(ValueError, match="world_size must be a positive int, got True"):
        ts.run(lambda comm: None, world_size=True)


@pytest.mark.real
@pytest.mark.timeout(120)
def test_on_gloo_bad_arguments_get_the_same_message_blaming_the_same_rank():
    def fn(comm):
        if comm.rank == 0:
            comm.all_gather(torch.ones(2), dim=0.0)
        comm.barrier()

    with pytest.raises(ValueError, match=r"^rank 0 raised ValueError: rank 0 of group \(0, 1\): all_gather got "
                                         r"dim=0.0 \(float\): it must be an integer dim$") as info:
        ts.run(fn, world_size=2, backend="gloo", timeout=60)
    assert info.value.rank == 0
    with pytest.raises(ValueError, match=r"got inf \(a finite one, the same on every backend\)"):
        ts.run(fn, world_size=2, backend="gloo", timeout=float("inf"))


# ---- the one checked entry point, comm.collective (core/ops.py declares each op's params) -----------

def test_the_generic_entry_point_takes_params_by_position_or_name_and_their_defaults():
    def fn(comm):
        x = torch.arange(4.0).reshape(2, 2) + 10 * comm.rank
        return (comm.collective("reduce_scatter", x, 1, "max"), comm.collective("reduce_scatter", x, op="max", dim=-1),
                comm.collective("all_gather", x), comm.collective("broadcast", x, src=1), comm.collective("barrier"))

    for rank, (by_position, by_name, gathered, broadcast, barrier) in enumerate(ts.run(fn, world_size=2).outputs):
        assert by_position.tolist() == by_name.tolist() == [[10.0 + rank], [12.0 + rank]]
        assert gathered.tolist() == [[0.0, 1.0], [2.0, 3.0], [10.0, 11.0], [12.0, 13.0]]  # dim=0 by default
        assert broadcast.tolist() == [[10.0, 11.0], [12.0, 13.0]] and barrier is None


def test_every_named_collective_wraps_its_table_entry_with_the_tables_defaults():
    import inspect

    from tpsp_sim.core import comm as comm_module
    from tpsp_sim.core import ops

    assert set(comm_module._CHECKS) == set(ops.PARAM_KINDS)
    for name, entry in ops.OPS.items():
        if entry.outputs is None:
            continue
        signature = inspect.signature(getattr(ts.Comm, name))
        declared = [(p.name, p.default) for p in entry.params]
        named = [(n, p.default) for n, p in signature.parameters.items() if n not in ("self", "x", "async_op")]
        assert named == [(n, inspect.Parameter.empty if d is ops.REQUIRED else d) for n, d in declared], name
    with pytest.raises(ValueError, match=r"Param 'dim': unknown kind 'dimension'; kinds are \['dim', "):
        ops.Param("dim", "dimension")
