"""The group data parallelism runs over: a ``Comm``, or a one-dim ``DeviceMesh`` (PyTorch's ``fully_shard``
takes a mesh; several mesh axes are flattened first, ``mesh["dp", "cp"]``, as torchtitan's FSDP over dp × cp)."""

from __future__ import annotations

from typing import Any

from ..core.comm import Comm
from ..core.mesh import DeviceMesh


def data_parallel_group(mesh_or_comm: Any, who: str) -> Comm:
    """The communicator of a ``Comm`` or a one-dim ``DeviceMesh``; a ValueError naming ``who`` for anything else."""
    if isinstance(mesh_or_comm, DeviceMesh):
        if len(mesh_or_comm.shape) != 1:
            raise ValueError(f"rank {mesh_or_comm.comm.rank}: {who} takes a 1-D mesh or a Comm, got a mesh of shape "
                             f"{mesh_or_comm.shape} {mesh_or_comm.mesh_dim_names}: pass the flattened axes, e.g. "
                             f"mesh[{mesh_or_comm.mesh_dim_names[:2]!r}]")
        return mesh_or_comm[mesh_or_comm.mesh_dim_names[0]]
    if isinstance(mesh_or_comm, Comm):
        return mesh_or_comm
    if mesh_or_comm is None:
        raise ValueError(f"{who}: the mesh does not include the calling rank (got None, which new_group returns "
                         f"to the ranks outside a group)")
    raise ValueError(f"{who} takes a Comm or a 1-D DeviceMesh, got {type(mesh_or_comm).__name__}")
