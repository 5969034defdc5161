"""ts.init_device_mesh: groups equal hand-written rank lists (last dim fastest), flattened axes, the
axis recorded on every event, bad shapes, and the same groups on real gloo processes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tpsp_sim as ts
from tpsp_sim.viz.plot import comm_bars


def mesh_groups(comm, shape, names):
    """{axis key: global ranks of this rank's group} plus coordinate, local ranks and sizes."""
    mesh = ts.init_device_mesh(comm, shape, mesh_dim_names=names)
    keys = [(n,) for n in names] + [tuple(names)]
    if len(names) == 3:
        keys += [names[:2], names[1:], (names[0], names[2])]
    groups = {k: mesh[k if len(k) > 1 else k[0]].group for k in keys}
    local = {n: (mesh.get_local_rank(n), mesh.size(n), mesh[n].rank) for n in names}
    return groups, mesh.shape, mesh.size(), local


def all_groups(shape, names):
    """{axis key: set of groups over every rank}, and each rank's local ranks."""
    out = ts.run(mesh_groups, shape, names, world_size=int(torch.tensor(shape).prod())).outputs
    keys = out[0][0].keys()
    return {k: {o[0][k] for o in out} for k in keys}, out


# Hand-written: rank = row-major index of the coordinate, the last dim fastest.
CASES = {
    ((8,), ("dp",)): {("dp",): {(0, 1, 2, 3, 4, 5, 6, 7)}},
    ((2, 4), ("cp", "tp")): {("cp",): {(0, 4), (1, 5), (2, 6), (3, 7)},
                             ("tp",): {(0, 1, 2, 3), (4, 5, 6, 7)},
                             ("cp", "tp"): {(0, 1, 2, 3, 4, 5, 6, 7)}},
    ((4, 2), ("dp", "tp")): {("dp",): {(0, 2, 4, 6), (1, 3, 5, 7)},
                             ("tp",): {(0, 1), (2, 3), (4, 5), (6, 7)},
                             ("dp", "tp"): {(0, 1, 2, 3, 4, 5, 6, 7)}},
    ((3, 2), ("dp", "tp")): {("dp",): {(0, 2, 4), (1, 3, 5)},
                             ("tp",): {(0, 1), (2, 3), (4, 5)},
                             ("dp", "tp"): {(0, 1, 2, 3, 4, 5)}},
    ((2, 2, 2), ("dp", "cp", "tp")): {
        ("dp",): {(0, 4), (1, 5), (2, 6), (3, 7)},
        ("cp",): {(0, 2), (1, 3), (4, 6), (5, 7)},
        ("tp",): {(0, 1), (2, 3), (4, 5), (6, 7)},
        ("dp", "cp"): {(0, 2, 4, 6), (1, 3, 5, 7)},
        ("cp", "tp"): {(0, 1, 2, 3), (4, 5, 6, 7)},
        ("dp", "tp"): {(0, 1, 4, 5), (2, 3, 6, 7)},
        ("dp", "cp", "tp"): {tuple(range(8))}},
    ((3, 1, 5), ("dp", "cp", "tp")): {  # odd sizes, and an axis of one rank
        ("dp",): {(i, i + 5, i + 10) for i in range(5)},
        ("cp",): {(i,) for i in range(15)},
        ("tp",): {(0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (10, 11, 12, 13, 14)},
        ("dp", "cp"): {(i, i + 5, i + 10) for i in range(5)},
        ("cp", "tp"): {(0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (10, 11, 12, 13, 14)},
        ("dp", "tp"): {tuple(range(15))},
        ("dp", "cp", "tp"): {tuple(range(15))}},
}


@pytest.mark.parametrize("shape, names", list(CASES))
def test_groups_equal_hand_written_rank_lists(shape, names):
    groups, outputs = all_groups(shape, names)
    for key, expected in CASES[shape, names].items():
        assert groups[key] == expected, key
    for rank, (_, mesh_shape, size, local) in enumerate(outputs):
        assert mesh_shape == shape and size == len(outputs), rank
        for n, (local_rank, n_size, group_rank) in local.items():
            assert local_rank == group_rank and n_size == shape[names.index(n)]


def every_group(comm, shape):
    mesh = ts.init_device_mesh(comm, shape, mesh_dim_names=tuple(f"d{i}" for i in range(len(shape))))
    return {key: group.group for key, group in mesh._groups.items()}


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=1, max_size=4).filter(lambda s: math.prod(s) <= 24))
def test_property_groups_are_the_ranks_that_differ_only_on_their_axes(shape):
    """Checked with numpy's row-major unravel_index, not the mesh's own arithmetic."""
    shape = tuple(shape)
    outputs = ts.run(every_group, shape, world_size=math.prod(shape), timeout=60).outputs
    coords = [np.unravel_index(r, shape) for r in range(math.prod(shape))]
    for rank, groups in enumerate(outputs):
        assert len(groups) == 2 ** len(shape) - 1  # one per non-empty subset of axes
        for key, ranks in groups.items():
            axes = [int(name[1:]) for name in key]
            same_elsewhere = [r for r in range(len(coords))
                              if all(coords[r][d] == coords[rank][d] for d in range(len(shape)) if d not in axes)]
            assert list(ranks) == same_elsewhere  # exactly those ranks, in row-major (global rank) order


def test_coordinate_of_rank_5_on_2x2x2():
    out = ts.run(lambda comm: ts.init_device_mesh(comm, (2, 2, 2), mesh_dim_names=("dp", "cp", "tp")).coordinate,
                 world_size=8).outputs
    assert out[5] == (1, 0, 1)  # 5 = 1·4 + 0·2 + 1
    assert out == [(a, b, c) for a in range(2) for b in range(2) for c in range(2)]


def test_size_and_local_rank_take_a_dim_index_as_pytorch_does():
    def sizes(comm):
        mesh = ts.init_device_mesh(comm, (2, 3, 1), mesh_dim_names=("dp", "cp", "tp"))
        return [mesh.size(d) for d in range(3)], [mesh.get_local_rank(d) for d in range(3)]

    out = ts.run(sizes, world_size=6).outputs
    assert out[5] == ([2, 3, 1], [1, 2, 0])  # 5 = 1·3 + 2
    with pytest.raises(ts.RankFailedError, match=r"has dims 0 .. 2, not 3"):
        ts.run(lambda comm: ts.init_device_mesh(comm, (2, 3, 1), mesh_dim_names=("dp", "cp", "tp")).size(3),
               world_size=6, timeout=30)


def one_call_per_axis(comm):
    mesh = ts.init_device_mesh(comm, (2, 2, 2), mesh_dim_names=("dp", "cp", "tp"))
    x = torch.ones(4, dtype=torch.float64)
    mesh["tp"].all_reduce(x)
    mesh["cp"].all_gather(x)
    mesh["dp", "cp"].all_reduce(x)
    comm.all_reduce(x)


def test_events_record_their_axis():
    trace = ts.run(one_call_per_axis, world_size=8).trace
    by_axis = trace.group_by("axis", "sent_bytes")
    # per rank: all_reduce 32 B on 2 ranks 2·1/2·32 = 32; all_gather 32 B on 2: 32;
    # all_reduce on 4: 2·3/4·32 = 48; the plain world comm on 8: 2·7/8·32 = 56 (axis None)
    assert by_axis == {"tp": 8 * 32, "cp": 8 * 32, "dp_cp": 8 * 48, None: 8 * 56}
    assert trace.count(axis="tp") == 8 and trace.count(axis=None) == 8


def test_plot_comm_bars_per_axis():
    bars = comm_bars(ts.run(one_call_per_axis, world_size=8).trace, by="axis")  # bytes per rank (the mean)
    assert bars == {"tp": {("all_reduce", "forward"): 32}, "cp": {("all_gather", "forward"): 32},
                    "dp_cp": {("all_reduce", "forward"): 48}, "-": {("all_reduce", "forward"): 56}}


@pytest.mark.parametrize("shape, names, message", [
    ((2, 3), ("dp", "tp"), "holds 6 ranks, but the communicator has world_size 4"),
    ((2, 2), ("tp", "tp"), "distinct"),
    ((4,), ("dp", "tp"), "one name per dim"),
])
def test_bad_shapes_raise_with_the_numbers(shape, names, message):
    with pytest.raises(ts.RankFailedError, match=message):
        ts.run(lambda comm: ts.init_device_mesh(comm, shape, mesh_dim_names=names), world_size=4, timeout=30)


def test_unknown_axis_or_order_raises():
    def ask(comm, key):
        return ts.init_device_mesh(comm, (2, 2), mesh_dim_names=("dp", "tp"))[key]

    with pytest.raises(ts.RankFailedError, match="has no axis"):
        ts.run(ask, ("tp", "dp"), world_size=4, timeout=30)  # flattened axes go in mesh order
    with pytest.raises(ts.RankFailedError, match="has no axis"):
        ts.run(ask, "cp", world_size=4, timeout=30)


def gloo_mesh(comm):
    mesh = ts.init_device_mesh(comm, (2, 2), mesh_dim_names=("cp", "tp"))
    x = torch.arange(4.0, dtype=torch.float64) + comm.rank
    return ({k: mesh[k].group for k in ("cp", "tp")}, mesh["cp", "tp"].group,
            mesh["tp"].all_reduce(x), mesh["cp"].all_gather(x))


@pytest.mark.real
@pytest.mark.timeout(180)
def test_gloo_and_sim_build_the_same_groups():
    sim = ts.run(gloo_mesh, world_size=4)
    real = ts.run(gloo_mesh, world_size=4, backend="gloo")
    for s, r in zip(sim.outputs, real.outputs):
        assert s[:2] == r[:2]
        torch.testing.assert_close(s[2], r[2], rtol=0, atol=0)
        torch.testing.assert_close(s[3], r[3], rtol=0, atol=0)
    assert sim.outputs[3][0] == {"cp": (1, 3), "tp": (2, 3)}
    assert real.trace.group_by("axis") == sim.trace.group_by("axis")
