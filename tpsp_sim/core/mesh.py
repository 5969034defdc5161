"""A device mesh: the ranks of a communicator laid out on a named n-dimensional grid (PyTorch's ``DeviceMesh``).

``init_device_mesh(comm, (2, 2, 2), mesh_dim_names=("dp", "cp", "tp"))`` puts rank ``r`` of ``comm`` at
the row-major coordinate of ``r`` — the last dim varies fastest, so the "tp" groups are neighbouring
ranks (Megatron's default order: TP innermost, then CP, then DP)::

    rank = ((dp · n_cp) + cp) · n_tp + tp          e.g. (2, 2, 2): tp groups {0,1} {2,3} ...,
                                                   cp groups {0,2} {1,3} ..., dp groups {0,4} {1,5} ...

``mesh["tp"]`` is a ``Comm`` over this rank's group on that axis (the ranks that differ only in
their "tp" coordinate); ``mesh["dp", "cp"]`` one over the flattened axes (the ranks that differ only
in dp and cp; rank order dp-major). Every group is built up front with ``comm.new_group``, axis
subset by axis subset, group by group in increasing order of its first rank: every rank creates
every group in the same order, as real ``torch.distributed`` requires. Each group's ``axis``
("tp", "dp_cp") is recorded on every ``CommEvent`` of its calls.

Differences from ``torch.distributed.device_mesh``: ``init_device_mesh``'s first argument is a
``Comm`` (PyTorch's is a device type, "cuda"); ``mesh["tp"]`` is a ``Comm``, not a 1-D ``DeviceMesh``
(PyTorch's ``mesh["tp"].get_group()`` is that communicator); ``mesh["dp", "cp"]`` is one ``Comm`` over
the flattened axes, where PyTorch returns a 2-D sub-mesh and flattens it with ``_flatten()``.
``size(dim)`` and ``get_local_rank(dim)`` take a name or an index, as PyTorch's do; ``submesh("dp", "cp",
"tp")`` is PyTorch's ``mesh["dp", "cp", "tp"]`` (a sub-mesh).

Four axes in Megatron's order, ``init_device_mesh(comm, (pp, dp, cp, tp), mesh_dim_names=("pp", "dp", "cp",
"tp"))``: pipeline stages slowest, rank = ((pp·n_dp + dp)·n_cp + cp)·n_tp + tp.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

from .comm import Comm


class DeviceMesh:
    """This rank's view of the grid: its coordinate and one communicator per subset of axes."""

    def __init__(self, comm: Comm, shape: tuple[int, ...], mesh_dim_names: tuple[str, ...],
                 groups: dict[tuple[str, ...], Comm]) -> None:
        self.comm, self.shape, self.mesh_dim_names, self._groups = comm, shape, mesh_dim_names, groups
        self.coordinate = coordinate(comm.rank, shape)

    def __getitem__(self, names: str | tuple[str, ...]) -> Comm:
        """The communicator over axis ``names`` (one name, or several in mesh order: flattened)."""
        key = (names,) if isinstance(names, str) else tuple(names)
        if key not in self._groups:
            raise ValueError(f"rank {self.comm.rank}: mesh {self.mesh_dim_names} has no axis {key}; give one name "
                             f"or several distinct names in mesh order")
        return self._groups[key]

    def _dim(self, name: str | int) -> int:
        if isinstance(name, int) and not isinstance(name, bool):
            if not 0 <= name < len(self.shape):
                raise ValueError(f"rank {self.comm.rank}: mesh {self.mesh_dim_names} has dims 0 .. "
                                 f"{len(self.shape) - 1}, not {name}")
            return name
        if name not in self.mesh_dim_names:
            raise ValueError(f"rank {self.comm.rank}: mesh {self.mesh_dim_names} has no axis {name!r}")
        return self.mesh_dim_names.index(name)

    def get_local_rank(self, name: str | int) -> int:
        """This rank's coordinate on axis ``name`` (a name or a dim index; its rank in ``mesh[name]``)."""
        return self.coordinate[self._dim(name)]

    def size(self, name: str | int | None = None) -> int:
        """The number of ranks on axis ``name`` (a name or a dim index; the whole mesh when None)."""
        return math.prod(self.shape) if name is None else self.shape[self._dim(name)]

    def submesh(self, *names: str) -> "DeviceMesh":
        """This rank's mesh over axes ``names`` only, the others fixed at this rank's coordinate (PyTorch's
        ``mesh["dp", "cp", "tp"]``): e.g. a pipeline stage's (dp, cp, tp) grid inside a (pp, dp, cp, tp) mesh."""
        dims = [self._dim(n) for n in names]
        if not names or dims != sorted(set(dims)):
            raise ValueError(f"rank {self.comm.rank}: submesh needs distinct axes of {self.mesh_dim_names} in mesh "
                             f"order, got {names}")
        groups = {key: g for key, g in self._groups.items() if set(key) <= set(names)}
        return DeviceMesh(self[names], tuple(self.shape[d] for d in dims), tuple(names), groups)

    def __repr__(self) -> str:
        dims = ", ".join(f"{n}={s}" for n, s in zip(self.mesh_dim_names, self.shape))
        return f"DeviceMesh({dims}; rank {self.comm.rank} at {self.coordinate})"


def coordinate(rank: int, shape: Sequence[int]) -> tuple[int, ...]:
    """The row-major coordinate of ``rank`` on a grid of ``shape`` (last dim fastest)."""
    coords = []
    for size in reversed(shape):
        rank, c = divmod(rank, size)
        coords.append(c)
    return tuple(reversed(coords))


def axis_groups(shape: Sequence[int], dims: Sequence[int]) -> list[tuple[int, ...]]:
    """Every group of ranks that differ only along ``dims`` (row-major order inside a group), by first rank."""
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    others = [d for d in range(len(shape)) if d not in dims]
    groups = []
    for fixed in itertools.product(*(range(shape[d]) for d in others)):
        base = sum(c * strides[d] for c, d in zip(fixed, others))
        groups.append(tuple(base + sum(c * strides[d] for c, d in zip(varying, dims))
                            for varying in itertools.product(*(range(shape[d]) for d in dims))))
    return sorted(groups)


def init_device_mesh(comm: Comm, mesh_shape: Sequence[int], *,
                     mesh_dim_names: Sequence[str]) -> DeviceMesh:
    """Lay ``comm``'s ranks on a grid of ``mesh_shape`` named ``mesh_dim_names`` (collective: every rank calls it).

    Builds one group per subset of axes (2^n - 1 subsets for n axes) and returns this rank's view.
    """
    shape, names = tuple(int(s) for s in mesh_shape), tuple(mesh_dim_names)
    if len(shape) != len(names) or not shape:
        raise ValueError(f"rank {comm.rank}: init_device_mesh got mesh_shape {shape} and mesh_dim_names {names}: "
                         f"they need one name per dim")
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"rank {comm.rank}: mesh_dim_names must be distinct non-empty strings, got {names}")
    if any(s < 1 for s in shape) or math.prod(shape) != comm.world_size:
        raise ValueError(f"rank {comm.rank}: mesh_shape {shape} holds {math.prod(shape)} ranks, but the "
                         f"communicator has world_size {comm.world_size}")
    groups: dict[tuple[str, ...], Comm] = {}
    for k in range(1, len(shape) + 1):
        for dims in itertools.combinations(range(len(shape)), k):
            axis = "_".join(names[d] for d in dims)
            for ranks in axis_groups(shape, dims):
                group = comm.new_group(ranks)
                if group is not None:
                    group.axis = axis
                    groups[tuple(names[d] for d in dims)] = group
    return DeviceMesh(comm, shape, names, groups)
