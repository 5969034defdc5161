"""Virtual ranks: one thread per rank, exact collectives, and failures that never hang.

All shared state lives in one ``SimWorld`` behind one condition variable. A rank that must wait
registers *what* it waits for (a predicate) before sleeping, so when every live rank is asleep
the world can test each predicate: if none can become true, that is a deadlock, reported with
what each rank waits for. A rank whose message has already arrived is not stuck.

A collective is a rendezvous: each rank of the group posts its input to the slot for that
group's next call; the last to arrive checks that all ranks called the same thing, computes every
rank's output (reducing in rank order, so runs are bitwise reproducible) and wakes the others.
A ``send`` is matched with the next ``recv`` on the same (group, src, dst) channel, in order,
like NCCL; a blocking send returns only once matched, so ring-ordering deadlocks show up here.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections import deque
from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import _disable_current_modes

from ..core.comm import Comm
from ..core.errors import CollectiveMismatchError, DeadlockError, RankFailedError, SimulationError, rank_failed
from ..core.flops import FlopCounter
from ..core.result import RunResult
from ..core.trace import CommTrace, Recorder


class _Aborted(BaseException):
    """Raised inside a rank thread to stop it after the run has already failed."""


def copy_error(error: SimulationError) -> SimulationError:
    """A fresh instance for each rank thread to raise (threads must not share one traceback)."""
    if isinstance(error, RankFailedError):
        return rank_failed(error.rank, error.__cause__) if error.__cause__ is not None else RankFailedError(error.rank, str(error))
    return type(error)(str(error))


class _Slot:
    """One call of a collective on one group: what each rank posted, then what each gets back."""

    def __init__(self, size: int) -> None:
        self.posted: dict[int, tuple[str, torch.Tensor | None, tuple]] = {}
        self.outputs: list[Any] | None = None
        self.taken = 0
        self.size = size


class _Message:
    """One posted send or receive on a channel."""

    def __init__(self, tensor: torch.Tensor | None = None, like: torch.Tensor | None = None) -> None:
        self.tensor = tensor
        self.like = like
        self.matched = False


class SimWorld:
    """The shared state of one simulated run."""

    def __init__(self, world_size: int, timeout: float | None) -> None:
        self.world_size = world_size
        # Enter the C-level lock (`with world.lock`), not the Condition: an _Aborted raised into a
        # thread then cannot land between acquiring the lock and the `with` that releases it.
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.groups: list[tuple[int, ...]] = [tuple(range(world_size))]
        self.slots: dict[tuple[int, int], _Slot] = {}
        self.calls: dict[tuple[int, int], int] = {}  # (group id, global rank) -> calls made so far
        self.sends: dict[tuple[int, int, int], deque[_Message]] = {}  # (group id, src, dst) -> unmatched
        self.recvs: dict[tuple[int, int, int], deque[_Message]] = {}
        self.blocked: dict[int, tuple[Callable[[], bool], Callable[[], str]]] = {}
        self.finished: set[int] = set()
        self.error: SimulationError | None = None
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout

    # ---- failure --------------------------------------------------------------------------------

    def fail(self, error: SimulationError) -> None:
        """Record the run's first error and wake every rank so each raises it. Call with the lock held."""
        if self.error is None:
            self.error = error
        self.cond.notify_all()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise copy_error(self.error)

    def _wait(self, rank: int, ready: Callable[[], bool], describe: Callable[[], str]) -> None:
        """Sleep until ``ready()``; detect deadlock first. Call with the lock held."""
        while True:
            self._raise_if_failed()
            if ready():
                return
            self.blocked[rank] = (ready, describe)
            try:
                self.check_deadlock()
                self._raise_if_failed()
                self.check_timeout()
                self._raise_if_failed()
                self.cond.wait(timeout=1.0)
            finally:
                del self.blocked[rank]

    def check_deadlock(self) -> None:
        """Fail with DeadlockError if every live rank waits and no wait can be satisfied. Lock held."""
        live = set(range(self.world_size)) - self.finished
        if not live or self.error is not None or not live <= self.blocked.keys():
            return
        if any(ready() for ready, _ in self.blocked.values()):
            return
        self.fail(DeadlockError("every live rank is blocked and none can progress:\n" + self._describe_blocked()))

    def check_timeout(self) -> None:
        """Fail the run once it has passed its timeout. Lock held."""
        if self.error is None and self.deadline is not None and time.monotonic() > self.deadline:
            self.fail(SimulationError(f"the run passed its timeout of {self.timeout} s; "
                                      f"ranks:\n{self._describe_blocked()}"))

    def _describe_blocked(self) -> str:
        lines = []
        for rank in range(self.world_size):
            if rank in self.blocked:
                lines.append(f"  rank {rank}: waits in {self.blocked[rank][1]()}")
            elif rank in self.finished:
                lines.append(f"  rank {rank}: has returned from fn")
            else:
                lines.append(f"  rank {rank}: running")
        return "\n".join(lines)

    def rank_done(self, rank: int) -> None:
        with self.lock:
            self.finished.add(rank)
            self.check_deadlock()
            self.cond.notify_all()

    # ---- collectives ----------------------------------------------------------------------------

    def collective(self, comm: "SimComm", op: str, x: torch.Tensor | None, params: tuple,
                   compute: Callable[[list], list]) -> Any:
        """Post this rank's input for the group's next call and return this rank's output."""
        me, gid, size = comm.global_rank, comm.group_id, comm.world_size
        with self.lock:
            self._raise_if_failed()
            call = self.calls.get((gid, me), 0)
            self.calls[gid, me] = call + 1
            slot = self.slots.setdefault((gid, call), _Slot(size))
            slot.posted[comm.rank] = (op, None if x is None else x.detach(), params)
            if len(slot.posted) == size:
                self._complete(comm, slot, call, compute)
            else:
                self._wait(me, lambda: slot.outputs is not None,
                           lambda: self._describe_slot(comm, slot, call, op, x, params))
            out = slot.outputs[comm.rank]
            slot.taken += 1
            if slot.taken == size:
                del self.slots[gid, call]
            return out

    def _complete(self, comm: "SimComm", slot: _Slot, call: int, compute: Callable[[list], list]) -> None:
        signatures = {(op, None if x is None else (tuple(x.shape), x.dtype), params)
                      for op, x, params in slot.posted.values()}
        if len(signatures) > 1:
            calls = "\n".join(f"  rank {r}: {_describe_call(*slot.posted[r])}" for r in sorted(slot.posted))
            self.fail(CollectiveMismatchError(
                f"ranks of group {comm.group} made different calls at collective #{call} of the group:\n{calls}"))
            self._raise_if_failed()
        inputs = [slot.posted[r][1] for r in range(slot.size)]
        with torch.no_grad(), _disable_current_modes():
            slot.outputs = compute(inputs)
        self.cond.notify_all()

    def _describe_slot(self, comm: "SimComm", slot: _Slot, call: int, op: str, x, params) -> str:
        missing = [r for r in range(slot.size) if r not in slot.posted]
        return (f"{_describe_call(op, x, params)}, collective #{call} of group {comm.group}, "
                f"for group ranks {missing} that have not called it")

    # ---- point to point -------------------------------------------------------------------------

    def post(self, comm: "SimComm", peer: int, message: _Message, sending: bool) -> None:
        """Post a send (to ``peer``) or a receive (from ``peer``) and match it if the other side is there."""
        me, other = comm.global_rank, comm.group[peer]
        key = (comm.group_id, me, other) if sending else (comm.group_id, other, me)
        with self.lock:
            self._raise_if_failed()
            waiting = (self.recvs if sending else self.sends).setdefault(key, deque())
            if not waiting:
                (self.sends if sending else self.recvs).setdefault(key, deque()).append(message)
                return
            send, recv = (message, waiting.popleft()) if sending else (waiting.popleft(), message)
            if send.tensor.shape != recv.like.shape or send.tensor.dtype != recv.like.dtype:
                self.fail(CollectiveMismatchError(
                    f"rank {key[2]} receives a tensor of shape {tuple(recv.like.shape)} ({recv.like.dtype}) "
                    f"from rank {key[1]}, which sends shape {tuple(send.tensor.shape)} ({send.tensor.dtype})"))
                self._raise_if_failed()
            recv.tensor = send.tensor
            send.matched = recv.matched = True
            self.cond.notify_all()

    def wait_message(self, comm: "SimComm", peer: int, message: _Message, sending: bool) -> None:
        x = message.tensor if sending else message.like
        what = (f"send to rank {comm.group[peer]}" if sending else f"recv from rank {comm.group[peer]}")
        with self.lock:
            self._wait(comm.global_rank, lambda: message.matched,
                       lambda: f"{what} (shape {tuple(x.shape)}, {x.dtype}) with no matching "
                               f"{'recv' if sending else 'send'} posted")


def _describe_call(op: str, x: torch.Tensor | None, params: tuple) -> str:
    tensor = "" if x is None else f"shape={tuple(x.shape)}, dtype={x.dtype}"
    names = {"all_gather": ("dim",), "all_reduce": ("op",), "reduce_scatter": ("dim", "op"),
             "broadcast": ("src",), "all_to_all": ("scatter_dim", "gather_dim"), "new_group": ("ranks",)}
    args = [f"{n}={v!r}" for n, v in zip(names.get(op, ()), params)]
    return f"{op}({', '.join(filter(None, [tensor, *args]))})"


# ---- what each collective computes, from every rank's input (in group-rank order) ---------------

_REDUCE = {"sum": torch.Tensor.add_, "prod": torch.Tensor.mul_,
           "max": lambda a, b: torch.maximum(a, b, out=a), "min": lambda a, b: torch.minimum(a, b, out=a)}


def _reduced(xs: list[torch.Tensor], op: str) -> torch.Tensor:
    acc = xs[0].clone()
    for x in xs[1:]:
        _REDUCE[op](acc, x)
    return acc


def _copies(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [x] + [x.clone() for _ in range(n - 1)]


class SimComm(Comm):
    """A virtual rank's communicator: the collectives run in-process, exactly."""

    backend = "sim"

    def __init__(self, world: SimWorld, rank: int, group: tuple[int, ...], group_id: int, recorder: Recorder) -> None:
        super().__init__(rank, group, recorder)
        self.world = world
        self.group_id = group_id

    def _all_gather(self, x, dim):
        return self.world.collective(self, "all_gather", x, (dim,), lambda xs: _copies(torch.cat(xs, dim), len(xs)))

    def _all_reduce(self, x, op):
        return self.world.collective(self, "all_reduce", x, (op,), lambda xs: _copies(_reduced(xs, op), len(xs)))

    def _reduce_scatter(self, x, dim, op):
        return self.world.collective(self, "reduce_scatter", x, (dim, op),
                                     lambda xs: [c.clone() for c in _reduced(xs, op).chunk(len(xs), dim)])

    def _broadcast(self, x, src):
        return self.world.collective(self, "broadcast", x, (src,), lambda xs: [xs[src].clone() for _ in xs])

    def _all_to_all(self, x, scatter_dim, gather_dim):
        def exchange(xs):
            pieces = [x.chunk(len(xs), scatter_dim) for x in xs]
            return [torch.cat([p[i] for p in pieces], gather_dim) for i in range(len(xs))]
        return self.world.collective(self, "all_to_all", x, (scatter_dim, gather_dim), exchange)

    def _barrier(self):
        self.world.collective(self, "barrier", None, (), lambda xs: [None] * len(xs))

    def _isend(self, x, dst):
        message = _Message(tensor=x.detach().clone())
        self.world.post(self, dst, message, sending=True)
        return _SimWork(self, dst, message, sending=True)

    def _irecv(self, like, src):
        message = _Message(like=like)
        self.world.post(self, src, message, sending=False)
        return _SimWork(self, src, message, sending=False)

    def _sendrecv(self, x, dst, src):
        sent, received = self._isend(x, dst), self._irecv(x, src)
        sent.wait()
        return received.wait()

    def _new_group(self, ranks):
        def register(xs):
            self.world.groups.append(tuple(self.group[r] for r in ranks))
            return [len(self.world.groups) - 1] * len(xs)
        group_id = self.world.collective(self, "new_group", None, (ranks,), register)
        if self.rank not in ranks:
            return None
        return SimComm(self.world, ranks.index(self.rank), self.world.groups[group_id], group_id, self.recorder)


class _SimWork:
    def __init__(self, comm: SimComm, peer: int, message: _Message, sending: bool) -> None:
        self.comm, self.peer, self.message, self.sending = comm, peer, message, sending

    def wait(self) -> torch.Tensor | None:
        self.comm.world.wait_message(self.comm, self.peer, self.message, self.sending)
        return None if self.sending else self.message.tensor


# ---- running fn on every virtual rank -----------------------------------------------------------

def run_virtual(fn: Callable, args: tuple, kwargs: dict, world_size: int, *,
                timeout: float | None = 600.0, count_flops: bool = False) -> RunResult:
    """Call ``fn(comm, *args, **kwargs)`` on ``world_size`` virtual ranks (threads) and collect the results."""
    world = SimWorld(world_size, timeout)
    recorders = [Recorder(r) for r in range(world_size)]
    outputs: list[Any] = [None] * world_size

    def main(rank: int) -> None:
        try:
            rank_main(rank)
        except _Aborted:  # stopped while already leaving
            pass

    def rank_main(rank: int) -> None:
        recorder = recorders[rank]
        comm = SimComm(world, rank, world.groups[0], 0, recorder)
        recorder.flop_counter = FlopCounter(recorder.label) if count_flops else None
        try:
            with recorder.flop_counter or nullcontext():
                outputs[rank] = fn(comm, *args, **kwargs)
                recorder.finish()
        except _Aborted:
            pass
        except SimulationError as error:
            with world.lock:  # our own copy of the run's error, or an error this rank detected
                if world.error is None:
                    world.fail(rank_failed(rank, error))
        except BaseException as error:  # noqa: BLE001 - any failure of user code fails the run
            with world.lock:
                world.fail(rank_failed(rank, error))
        finally:
            recorder.flop_counter = None
            world.rank_done(rank)

    threads = [threading.Thread(target=main, args=(r,), name=f"tpsp_sim-rank{r}", daemon=True)
               for r in range(world_size)]
    try:
        for t in threads:
            t.start()
        _join(threads, world)
    except KeyboardInterrupt:
        with world.lock:
            world.fail(SimulationError("interrupted (KeyboardInterrupt)"))
        _stop(threads)
        raise
    if world.error is not None:
        raise copy_error(world.error) from world.error.__cause__
    return RunResult(outputs, CommTrace.from_recorders(recorders))


def _join(threads: list[threading.Thread], world: SimWorld) -> None:
    """Wait for every rank; once the run has failed, give ranks that are computing a second, then stop them."""
    failed_at = None
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=0.05)
        with world.lock:
            world.check_timeout()
        if world.error is not None:
            failed_at = failed_at or time.monotonic()
            if time.monotonic() - failed_at > 1.0:
                _stop(threads)
                return


def _stop(threads: list[threading.Thread]) -> None:
    """Raise _Aborted inside every rank thread still running, and wait for them to end."""
    for t in threads:
        if t.is_alive():
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(_Aborted))
    deadline = time.monotonic() + 10.0
    for t in threads:
        if t.ident is not None:  # started
            t.join(timeout=max(0.0, deadline - time.monotonic()))
