"""torch.distributed's process-wide state, made per virtual rank while a run lasts, and restored after.

c10d keeps its groups in two process-wide places: the Python ``_world`` of
``torch.distributed.distributed_c10d`` (default group, group names, ranks, tags...) and a C++ registry
of group names that the functional collectives (and so DTensor and FSDP2) resolve names in. Virtual
ranks are threads of one process, so each needs its own of both. PyTorch's own tests do the same
(``torch/testing/_internal/distributed/multi_threaded_pg.py`` keeps a ``WorldData`` per thread and
``common_distributed.py`` switches the C++ registry to thread isolation); this module is written
from them and imports no ``torch.testing`` module.

``installed()`` (the first run in progress to enter it) swaps ``_world`` for ``RankWorlds``, sets
thread isolation, registers the ``"tpsp_sim"`` backend, and saves what ``init_process_group``
overwrites (``_backend``, ``_default_pg_init_method``, ``sys.excepthook``); the last run to leave
restores every one of them, however the run ended (the excepthook only if it is still c10d's, and of
the backend tables only its own entries: what others register meanwhile stays). A rank thread holds a ``RankWorld`` of its own;
any other thread (the caller supervising the run) sees the world that was there before, so a real
process group of the caller keeps working on the Python side.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch._C._distributed_c10d import _set_thread_isolation_mode

BACKEND = "tpsp_sim"

# The fields of c10d's _World that live in module globals there: each RankWorld holds its own.
_PER_RANK = ("pg_map", "pg_names", "pg_group_ranks", "pg_backend_config", "tags_to_pg", "pg_to_tag",
             "pg_coalesce_state")


class RankWorld(c10d._World):
    """One virtual rank's c10d state: every field of ``_World`` held by this object, none in globals."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, Any] = {name: {} for name in _PER_RANK}
        self.count = 0

    def _field(name: str) -> property:  # noqa: N805 - builds the class's properties below
        return property(lambda self: self.fields[name])

    pg_map, pg_names, pg_group_ranks, pg_backend_config, tags_to_pg, pg_to_tag, pg_coalesce_state = map(
        _field, _PER_RANK)
    del _field

    @property
    def group_count(self) -> int:
        return self.count

    @group_count.setter
    def group_count(self, value: int) -> None:
        self.count = value


class RankWorlds(c10d._World):
    """What ``distributed_c10d._world`` is while runs are in progress: the calling thread's ``RankWorld``
    in a rank thread, the world from before the runs in any other thread."""

    def __init__(self, before: c10d._World) -> None:
        super().__init__()
        self.before = before
        self.local = threading.local()  # .world: the RankWorld of a rank thread; .real: inside real_world()

    def target(self) -> c10d._World:
        if getattr(self.local, "real", False):
            return self.before
        return getattr(self.local, "world", None) or self.before

    @contextmanager
    def real_world(self) -> Iterator[None]:
        """In this thread, c10d sees the world from before the runs while the block runs (a real process's
        own gloo / NCCL groups, which ``TorchComm`` calls on)."""
        previous, self.local.real = getattr(self.local, "real", False), True
        try:
            yield
        finally:
            self.local.real = previous

    def _forward(name: str, settable: bool = False) -> property:  # noqa: N805
        def get(self):
            return getattr(self.target(), name)

        def put(self, value):
            setattr(self.target(), name, value)
        return property(get, put if settable else None)

    default_pg = _forward("default_pg", settable=True)
    group_count = _forward("group_count", settable=True)
    pg_map, pg_names, pg_group_ranks, pg_backend_config, tags_to_pg, pg_to_tag, pg_coalesce_state, comms = map(
        _forward, (*_PER_RANK, "comms"))
    del _forward


_in_progress = 0  # runs in progress with torch.distributed installed
_saved: dict[str, Any] = {}
_lock = threading.Lock()
_MISSING = object()


def _register(creator: Callable) -> dict[str, Any]:
    """Register the backend; return what its entries replaced, for ``_unregister`` (registrations others
    make meanwhile, e.g. torch.testing's "fake" backend imported during a run, are kept)."""
    name = BACKEND.lower()
    saved = {"listed": name in dist.Backend.backend_list, "attr": dist.Backend.__dict__.get(BACKEND.upper(), _MISSING),
             "cpu": dist.Backend.default_device_backend_map.get("cpu", _MISSING),
             **{key: table.get(k, _MISSING) for key, table, k in _tables()}}
    dist.Backend.register_backend(BACKEND, creator, extended_api=True, devices=["cpu"])
    return saved


def _tables() -> list[tuple[str, dict, str]]:
    return [("type", dist.Backend.backend_type_map, BACKEND.lower()),
            ("capability", dist.Backend.backend_capability, BACKEND.lower()),
            ("plugin", dist.Backend._plugins, BACKEND.upper())]


def _unregister(saved: dict[str, Any]) -> None:
    """Put back what ``_register`` replaced, entry by entry."""
    for key, table, k in _tables():
        if saved[key] is _MISSING:
            table.pop(k, None)
        else:
            table[k] = saved[key]
    if not saved["listed"] and BACKEND.lower() in dist.Backend.backend_list:
        dist.Backend.backend_list.remove(BACKEND.lower())
    if saved["attr"] is _MISSING:
        delattr(dist.Backend, BACKEND.upper())
    else:
        setattr(dist.Backend, BACKEND.upper(), saved["attr"])
    if saved["cpu"] is not _MISSING:  # register_backend claims "cpu" only where no backend had it
        dist.Backend.default_device_backend_map["cpu"] = saved["cpu"]
    elif dist.Backend.default_device_backend_map.get("cpu") == BACKEND.lower():
        del dist.Backend.default_device_backend_map["cpu"]


@contextmanager
def installed(creator: Callable) -> Iterator[RankWorlds]:
    """Per-rank torch.distributed state for the runs in progress; everything restored by the last to end."""
    global _in_progress
    with _lock:
        if _in_progress == 0:
            _saved.update(world=c10d._world, backend=c10d._backend, init_method=c10d._default_pg_init_method,
                          excepthook=sys.excepthook, tables=_register(creator))
            c10d._world = RankWorlds(c10d._world)
            _set_thread_isolation_mode(True)
        _in_progress += 1
        worlds = c10d._world
    try:
        yield worlds
    finally:
        with _lock:
            _in_progress -= 1
            if _in_progress == 0:
                _set_thread_isolation_mode(False)
                c10d._world = _saved["world"]
                c10d._backend, c10d._default_pg_init_method = _saved["backend"], _saved["init_method"]
                if getattr(sys.excepthook, "__name__", "") == "_distributed_excepthook":  # init_process_group's
                    sys.excepthook = _saved["excepthook"]
                _unregister(_saved["tables"])
                _saved.clear()
