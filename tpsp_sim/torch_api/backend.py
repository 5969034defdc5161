"""The ``"tpsp_sim"`` torch.distributed backend: ``init_process_group`` on every rank of a run.

``ts.run(fn, world_size=N, torch_distributed=True)`` enters ``installed()`` around the run (world.py:
per-rank c10d state, restored when the run ends) and ``default_group(comm)`` in each rank thread
around ``fn``: that calls ``dist.init_process_group("tpsp_sim", rank, world_size)``, whose group is a
``CommProcessGroup`` over the rank's own ``Comm``, and destroys it when ``fn`` returns or raises.

``dist.new_group(ranks)`` (and ``init_device_mesh``, which calls it per mesh dim) reaches the
backend's creator only on the ranks in the group, so on the simulator the creator cannot use the
collective ``comm.new_group``: it registers the group with the run's world itself, the k-th group
any rank creates on a given tuple of ranks being the same group on every rank of it (c10d too
requires every rank to create groups in the same order).

On real processes (``ts.run(..., backend="gloo", torch_distributed=True)``) the worker has already
joined the real group and built its ``TorchComm``; ``on_default_group(fn)`` runs ``fn`` with the same
backend over that ``TorchComm``, so the very same ``dist.*`` calls are recorded the same way and run on
gloo. A ``TorchComm`` calls torch.distributed itself, on the process's real groups: it does so in
``real_world()`` (world.py), and a subgroup is a real gloo group made by its members only
(``use_local_synchronization``), since c10d calls the creator on the members only. The comm ``fn``
gets is such a ``TorchComm`` too, so its own calls (the ``comm`` API) reach the real groups. Without
the flag, ``without_default_group(fn)`` hides the worker's group from ``fn``'s ``dist.*`` calls, which
raise as they do on the simulator (they would run on gloo unrecorded).

Where no default group exists, torch's "Default process group has not been initialized" gets a note
saying where the calling thread stands: not inside ts.run, inside one without ``torch_distributed=True``,
or on a rank that destroyed its group (``_say_why_no_default_group``, installed on import).
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from datetime import timedelta
from functools import partial, wraps
from typing import Any, Callable, Iterator

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from ..core.comm import Comm
from ..core.errors import RankFailedError, SimulationError
from ..dist.torch_comm import TorchComm
from ..sim.runtime import SimComm
from ..sim.runtime import _current as _sim_rank  # .world in a rank thread of a simulated run
from ..sim.world import SimWorld
from .process_group import CommProcessGroup
from .world import BACKEND, RankWorld, RankWorlds
from . import world as _world

_rank = threading.local()  # in a rank thread with a default group: .comm, .made (ranks -> groups made so far)


class _Run:
    """What the ranks of one simulated run share: c10d's store (the store-based barriers that
    TORCH_DIST_INIT_BARRIER=1 asks for meet in it), and the groups made so far, (ranks, k) -> group id."""

    def __init__(self) -> None:
        self.store = dist.HashStore()
        self.groups: dict[tuple[tuple[int, ...], int], int] = {}


_runs: "weakref.WeakKeyDictionary[SimWorld, _Run]" = weakref.WeakKeyDictionary()


def _run_of(world: SimWorld) -> _Run:
    with world.lock:
        return _runs.setdefault(world, _Run())


def _sim_subgroup(comm: SimComm, ranks: tuple[int, ...], k: int) -> SimComm:
    """The SimComm of the k-th group over global ``ranks`` created in ``comm``'s run."""
    world, ids = comm.world, _run_of(comm.world).groups
    with world.lock:
        if (ranks, k) not in ids:
            world.groups.append(ranks)
            ids[ranks, k] = len(world.groups) - 1
        group_id = ids[ranks, k]
    return SimComm(world, ranks.index(comm.global_rank), ranks, group_id, comm.recorder)


class _RealTorchComm(TorchComm):
    """A ``TorchComm`` that calls torch.distributed in the process's real c10d world (not the rank's own)."""

    def __init__(self, pg: dist.ProcessGroup, like: TorchComm) -> None:
        with dist.distributed_c10d._world.real_world():
            super().__init__(pg, like.recorder, like.device, like._calls)

    def _new_group(self, ranks: Any) -> "_RealTorchComm | None":
        with dist.distributed_c10d._world.real_world():
            comm = super()._new_group(ranks)
        return None if comm is None else _RealTorchComm(comm.pg, comm)


def _in_real_world(method: Callable) -> Callable:
    def call(self, *args: Any, **kwargs: Any) -> Any:
        with dist.distributed_c10d._world.real_world():
            return method(self, *args, **kwargs)
    return call


for _name in ("_collective", "_isend", "_irecv", "_sendrecv"):
    setattr(_RealTorchComm, _name, _in_real_world(getattr(TorchComm, _name)))


def _real_subgroup(comm: TorchComm, ranks: tuple[int, ...]) -> TorchComm:
    with dist.distributed_c10d._world.real_world():
        pg = dist.new_group(list(ranks), use_local_synchronization=True)
    return _RealTorchComm(pg, comm)


def _create(options: Any, backend_options: Any) -> CommProcessGroup:
    """c10d's creator for the backend (extended API: it gets the group's global ranks)."""
    comm: Comm | None = getattr(_rank, "comm", None)
    if comm is None:
        raise SimulationError("torch.distributed's tpsp_sim backend works only inside ts.run(..., "
                              "torch_distributed=True): not inside ts.run")
    ranks = tuple(options.global_ranks_in_group)
    if isinstance(comm, TorchComm):
        return CommProcessGroup(_real_subgroup(comm, ranks) if ranks else _RealTorchComm(comm.pg, comm))
    if not ranks:  # the default group
        return CommProcessGroup(comm)
    k = _rank.made.get(ranks, 0)
    _rank.made[ranks] = k + 1
    return CommProcessGroup(_sim_subgroup(comm, ranks, k))


@contextmanager
def installed() -> Iterator[RankWorlds]:
    """torch.distributed made per virtual rank while the runs inside last (see world.py)."""
    with _world.installed(_create) as worlds:
        yield worlds


def _why_no_default_group() -> str:
    """Where the calling thread stands, for torch's "Default process group has not been initialized"."""
    in_run = getattr(_sim_rank, "world", None) is not None or getattr(_rank, "without_group", False)
    if not in_run:
        return ("tpsp_sim: not inside ts.run: this thread is no rank of a run; dist.* calls have a default group "
                "only in the rank threads that ts.run(fn, world_size=N, torch_distributed=True) starts for fn (a "
                "real process gets one from dist.init_process_group)")
    if getattr(_rank, "comm", None) is None:
        return ("tpsp_sim: inside ts.run without torch_distributed=True: pass torch_distributed=True, and every "
                "rank gets an initialised torch.distributed default group for its dist.* calls")
    return "tpsp_sim: this rank's default group was destroyed inside fn (dist.destroy_process_group)"


def _say_why_no_default_group(get_default_group: Callable[[], dist.ProcessGroup]) -> Callable[[], dist.ProcessGroup]:
    """torch's ``_get_default_group``, which adds a note to its error saying where the calling thread stands.

    Installed once, on import (c10d's own dist.* functions look it up in their module when called).
    Nothing else changes: where a default group exists it is returned as before, and without one torch's
    ValueError is raised as before, same type and message, with one note (PEP 678) added. Calls that
    bypass it: modules that imported the name before tpsp_sim was imported (device_mesh, fsdp's
    ``_init_utils``), and ``_get_default_store``, which raises the same message on its own.
    """
    @wraps(get_default_group)
    def get() -> dist.ProcessGroup:
        try:
            return get_default_group()
        except ValueError as error:
            error.add_note(_why_no_default_group())
            raise

    get.tpsp_sim_wraps = get_default_group  # a reload wraps torch's function, not this one
    return get


c10d._get_default_group = _say_why_no_default_group(
    getattr(c10d._get_default_group, "tpsp_sim_wraps", c10d._get_default_group))


@contextmanager
def no_default_group_left() -> Iterator[None]:
    """Around a simulated run without ``torch_distributed=True``: a default group that fn's ranks made with
    their own ``dist.init_process_group`` (process-wide: every virtual rank would share it) is destroyed
    when the run ends, and the run fails with a SimulationError saying so (or, if it failed, a note)."""
    before = dist.is_initialized()
    try:
        yield
    except BaseException as error:
        if not before and dist.is_initialized():
            dist.destroy_process_group()
            error.add_note(_MADE_ITS_OWN)
        raise
    if not before and dist.is_initialized():
        dist.destroy_process_group()
        raise SimulationError(_MADE_ITS_OWN)


_MADE_ITS_OWN = ("fn called dist.init_process_group on a virtual rank: its default group is process-wide, one "
                 "for every rank of the run, and would outlive it (it was destroyed); pass torch_distributed=True "
                 "to ts.run instead, and every rank gets an initialised default group of its own")


@contextmanager
def failure_says_why_no_default_group() -> Iterator[None]:
    """Around a run: a rank's failure for want of a default group carries the note its cause got."""
    try:
        yield
    except RankFailedError as error:
        for note in getattr(error.__cause__, "__notes__", ()):
            if note.startswith("tpsp_sim: ") and note not in getattr(error, "__notes__", ()):
                error.add_note(note)
        raise


@contextmanager
def default_group(comm: Comm) -> Iterator[None]:
    """In a rank thread, inside ``installed()``: the default process group over ``comm`` while the block runs."""
    worlds = dist.distributed_c10d._world
    if not isinstance(worlds, RankWorlds):
        raise SimulationError("default_group needs torch_api.installed() around the run")
    worlds.local.world = RankWorld()
    _rank.comm, _rank.made = comm, {}
    try:
        sim = isinstance(comm, SimComm)
        dist.init_process_group(BACKEND, rank=comm.rank, world_size=comm.world_size,
                                store=_run_of(comm.world).store if sim else dist.HashStore(),
                                timeout=timedelta(seconds=comm.world.timeout or 86400) if sim else None)
        yield
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            del worlds.local.world
            del _rank.comm, _rank.made


def on_default_group(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run with torch.distributed's default group over its comm: for real processes, whose workers
    call ``fn(comm, ...)`` (picklable: a partial of a module-level function)."""
    return partial(_call_on_default_group, fn)


def without_default_group(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run on a real process with no default group in sight, as on the simulator without
    ``torch_distributed=True``: its ``dist.*`` calls raise (they would run unrecorded on the worker's own group)."""
    return partial(_call_without_default_group, fn)


def _call_on_default_group(fn: Callable[..., Any], comm: TorchComm, *args: Any, **kwargs: Any) -> Any:
    with installed(), default_group(comm):
        return fn(_RealTorchComm(comm.pg, comm), *args, **kwargs)  # the comm API calls on the real groups


def _call_without_default_group(fn: Callable[..., Any], comm: TorchComm, *args: Any, **kwargs: Any) -> Any:
    with installed() as worlds:
        worlds.local.world, _rank.without_group = RankWorld(), True
        try:
            return fn(_RealTorchComm(comm.pg, comm), *args, **kwargs)
        finally:
            del worlds.local.world, _rank.without_group
