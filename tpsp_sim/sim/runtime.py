"""Virtual ranks: one thread per rank, taking turns (world.py), exact collectives, and failures that never hang.

``run_virtual`` starts a thread per rank and supervises them. Liveness is tracked here, not with
``Thread.is_alive()`` (on CPython 3.11 a signal that interrupts ``Thread.join(timeout)`` marks a
still-running thread as stopped): each rank's last step puts its number on a queue, and the
supervisor counts the numbers it has taken.

When the run fails (a rank raised, a deadlock, a mismatch, the timeout, a KeyboardInterrupt, or
the run this one is nested in failed), ranks waiting in the runtime wake and raise at once; ranks
computing in ``fn`` raise at their next ``Comm`` call, and those that have not reached one within
POLL get an asynchronous ``Aborted`` that stops them at their next Python instruction (never a rank
waiting in the runtime or supervising a nested run; ``main`` is written so that it may land anywhere
in the rank's own code). A rank that swallows it (a bare ``except:``) gets another every RESEND s.
A rank inside one long C call (a big matmul, ``time.sleep``, ``Event.wait``) cannot be interrupted:
the error is reported anyway after a short grace, with a note saying which ranks did not stop and
why, and every ``Comm`` call they make afterwards raises at once; a daemon thread keeps interrupting
them until they leave fn. A second Ctrl-C while a run stops is ignored: the stop always completes.
"""

from __future__ import annotations

import copy
import ctypes
import signal
import threading
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from queue import Empty, SimpleQueue
from typing import Any, Callable, Iterator

import torch

from ..core.comm import Comm
from ..core.errors import SimulationError, rank_failed
from ..core.ops import OPS
from ..core.flops import FlopCounter
from ..core.result import RunResult
from ..core.trace import CommTrace, Recorder
from .world import RUNNERS, Aborted, PostedCall, SimWorld, _Message, copy_error, detached, format_ranks

POLL = 0.05  # seconds between the supervisor's checks of the timeout and of stalled turns
GRACE = 0.5  # seconds a failed run's ranks get to stop before the error is reported without them
RESEND = 0.1  # seconds between two stops of a rank that swallowed the last one (a bare ``except:``)
QUIET_RESEND = 1.0  # seconds after which a stop that never landed is sent again (world.py, ``Aborted``)
STOP_POLL = 0.002  # seconds between two looks for ranks that left, while stopping them

_current = threading.local()  # in a rank thread: .world and .rank, the run it belongs to and its rank


class SimComm(Comm):
    """A virtual rank's communicator: the collectives run in-process, exactly."""

    backend = "sim"

    def __init__(self, world: SimWorld, rank: int, group: tuple[int, ...], group_id: int, recorder: Recorder) -> None:
        super().__init__(rank, group, recorder, world.group_label(group_id))
        self.world = world
        self.group_id = group_id

    def _record(self, op: str, x: torch.Tensor, *, root: int = 0, peer: int | None = None, blocking: bool = True,
                batched: bool = False):
        world = self.world
        if world.error is not None or world.closed:  # a comm of a failed or finished run records nothing
            world.check_usable(self.global_rank)  # (raises; the test above keeps the per-call cost down)
        return super()._record(op, x, root=root, peer=peer, blocking=blocking, batched=batched)

    def _collective(self, op: str, x: torch.Tensor | None, *params: Any) -> Any:
        """Post ``x``; once every rank of the group has, each gets its part of ``OPS[op].outputs`` (ops.py)."""
        outputs = OPS[op].outputs
        return self.world.collective(self, op, x, params, lambda xs: outputs(xs, *params))

    def _post_collective(self, op: str, x: torch.Tensor | None, *params: Any) -> "_PostedWork":
        """Post ``x`` (a copy: the rank may change ``x`` before it waits) and return at once; ``wait()``
        returns this rank's output once every rank of the group has posted (world.py)."""
        outputs = OPS[op].outputs
        own = None if x is None else detached(x).clone()
        posted = self.world.collective(self, op, own, params, lambda xs: outputs(xs, *params), wait=False)
        return _PostedWork(self, posted)

    def _isend(self, x, dst):
        message = _Message(self.recorder.scope, tensor=detached(x).clone())
        self.world.post(self, dst, message, sending=True)
        return _SimWork(self, dst, message, sending=True)

    def _irecv(self, like, src):
        message = _Message(self.recorder.scope, like=like)
        self.world.post(self, src, message, sending=False)
        return _SimWork(self, src, message, sending=False)

    def _sendrecv(self, x, dst, src):
        scope = self.recorder.scope
        send, recv = _Message(scope, tensor=detached(x).clone()), _Message(scope, like=x)
        self.world.sendrecv(self, send, dst, recv, src)
        return recv.tensor

    def _new_group(self, ranks):
        def register(xs):  # runs outside the world lock, maybe alongside another group's new_group
            with self.world.lock:
                self.world.groups.append(tuple(self.group[r] for r in ranks))
                return [len(self.world.groups) - 1] * len(xs)
        group_id = self.world.collective(self, "new_group", None, (ranks,), register)
        if self.rank not in ranks:
            return None
        return SimComm(self.world, ranks.index(self.rank), self.world.groups[group_id], group_id, self.recorder)


class _PostedWork:
    __slots__ = ("comm", "posted")

    def __init__(self, comm: SimComm, posted: PostedCall) -> None:
        self.comm, self.posted = comm, posted

    def wait(self) -> Any:
        return self.comm.world.wait_collective(self.comm, self.posted)


class _SimWork:
    __slots__ = ("comm", "peer", "message", "sending")

    def __init__(self, comm: SimComm, peer: int, message: _Message, sending: bool) -> None:
        self.comm, self.peer, self.message, self.sending = comm, peer, message, sending

    def wait(self) -> torch.Tensor | None:
        self.comm.world.wait_messages(self.comm, [(self.peer, self.message, self.sending)])
        return None if self.sending else self.message.tensor


# ---- running fn on every virtual rank -----------------------------------------------------------

def run_virtual(fn: Callable, args: tuple, kwargs: dict, world_size: int, *,
                timeout: float | None = 600.0, count_flops: bool = False,
                rank_context: Callable[[Comm], AbstractContextManager] | None = None) -> RunResult:
    """Call ``fn(comm, *args, **kwargs)`` on ``world_size`` virtual ranks (threads) and collect the results.

    ``rank_context(comm)``, if given, is entered in each rank's thread around ``fn`` (torch_api/ uses
    it to give each rank a torch.distributed default group)."""
    recorders = [Recorder(r) for r in range(world_size)]
    world = SimWorld(recorders, timeout)
    parent: SimWorld | None = getattr(_current, "world", None)  # this run is nested in a rank of another
    parent_rank: int = getattr(_current, "rank", -1)
    outputs: list[Any] = [None] * world_size
    done: SimpleQueue[int] = SimpleQueue()  # each rank puts its number as its very last step
    exited: set[int] = set()

    def main(rank: int) -> None:
        try:
            try:
                rank_main(rank)
            except Aborted:  # stopped from outside after the run failed
                pass
        except Aborted:  # a repeated stop (fn swallowed the one before) landing in the handler above
            pass
        finally:
            try:  # a repeated stop may land here too, at most once: leave() ends the stops
                leave(rank)
            except Aborted:
                leave(rank)

    def leave(rank: int) -> None:
        world.rank_done(rank)  # from now on no Aborted is sent to this thread
        # One sent earlier may still be pending: CPython 3.11 can deliver it late when several threads
        # got one (the first to take its own clears the interpreter's flag). Drop it. Only if one was sent:
        # the call walks every thread of the interpreter (8,000 ranks: 64 million steps in all).
        if rank in world.aborted:  # added before any send, under the lock rank_done just took
            _async_raise(threading.get_ident(), None)
        done.put(rank)  # one C call; a second put after an Aborted is harmless (a set counts exits)

    def rank_main(rank: int) -> None:
        _current.world, _current.rank = world, rank
        recorder = recorders[rank]
        comm = SimComm(world, rank, world.groups[0], 0, recorder)
        recorder.flop_counter = FlopCounter(recorder.label) if count_flops else None
        try:
            world.enter(rank)
            own_args, own_kwargs = own_copies((args, kwargs))
            with rank_context(comm) if rank_context else nullcontext(), recorder.flop_counter or nullcontext():
                outputs[rank] = fn(comm, *own_args, **own_kwargs)
                recorder.finish()
        except SimulationError as error:
            with world.lock:  # our own copy of the run's error, or an error this rank detected
                if world.error is None:
                    world.fail(rank_failed(rank, error))
        except Aborted:
            raise
        except BaseException as error:  # noqa: BLE001 - any failure of user code fails the run
            with world.lock:
                world.fail(rank_failed(rank, error))
        finally:
            recorder.flop_counter = None

    if parent is not None:
        parent.adopt(world, parent_rank)
    threads = [threading.Thread(target=main, args=(r,), name=f"tpsp_sim-rank{r}", daemon=True)
               for r in range(world_size)]
    with _one_interrupt():  # a second Ctrl-C is ignored until the ranks are stopped
        try:
            with _one_intra_op_thread(nested=parent is not None):
                for t in threads:
                    t.start()
                _supervise(world, done, exited)
        except BaseException as interruption:  # KeyboardInterrupt, say
            with _interrupts_deferred():  # a second Ctrl-C must not cut the stop short (ranks would spin on)
                with world.lock:
                    world.fail(SimulationError(f"interrupted ({type(interruption).__name__})"))
                exited.update(r for r, t in enumerate(threads) if t.ident is None)  # never started
                _stop(world, done, exited)
                _keep_stopping(world, done, exited)
            raise
        finally:
            world.close()
            if parent is not None:
                parent.disown(world, parent_rank)
        if world.error is None:
            unmatched = world.unmatched()
            if unmatched is not None:
                raise unmatched
        if world.error is not None:
            error = copy_error(world.error)
            note = _not_stopped(world, exited)
            if note:
                error.add_note(note)
            _keep_stopping(world, done, exited)
            raise error from world.error.__cause__
        return RunResult(outputs, CommTrace.from_recorders(recorders))


def _not_stopped(world: SimWorld, exited: set[int]) -> str:
    """What the ranks that did not stop within GRACE are doing, as far as the runtime can tell."""
    with world.lock:
        swallowed, nesting, woken, native = [], [], [], []
        for rank in sorted(set(range(world.world_size)) - exited):
            if world.thread_ids.get(rank) in Aborted.landed:
                swallowed.append(rank)
            elif rank in world.nesting:
                nesting.append(rank)
            elif rank in world.blocked:
                woken.append(rank)
            else:
                native.append(rank)
    said = []
    for ranks, why in [
            (woken, "waiting in the runtime for {its} turn to raise the error (ranks take turns, "
                    f"{RUNNERS} at a time)"),
            (native, "still inside native code (one long C call: a matmul, time.sleep, Event.wait...); {it} "
                     "{stops} at the next Python instruction"),
            (swallowed, "{it} caught the stop (tpsp_sim's Aborted, a BaseException, which a bare `except:` or "
                        f"`except BaseException:` in fn swallows) and went on; it is raised again every {RESEND} s "
                        "until {it} {leaves} fn"),
            (nesting, "still stopping the run nested inside {it}")]:
        if ranks:
            many = len(ranks) > 1
            words = {"its": "their" if many else "its", "it": "they" if many else "it",
                     "stops": "stop" if many else "stops", "leaves": "leave" if many else "leaves"}
            said.append(f"{_ranks(ranks)} did not stop within {GRACE} s: {why.format(**words)}.")
    if not said:
        return ""
    return " ".join(said) + " Every Comm call they make raises at once."


def _ranks(ranks: list[int]) -> str:
    """``rank 3``, ``ranks 1-4, 7``; past 8 runs of consecutive ranks, the first 8 and how many in all."""
    text = format_ranks(ranks)
    runs = text.split(", ")
    if len(runs) > 8:
        text = ", ".join(runs[:8]) + f", ... ({len(ranks)} ranks)"
    return f"rank{'s' if len(ranks) > 1 else ''} {text}"


@contextmanager
def _one_interrupt() -> Iterator[None]:
    """While a run is in progress in the main thread with Python's default Ctrl-C handler: the first Ctrl-C
    raises KeyboardInterrupt as usual, later ones are ignored until the run has stopped its ranks (a second
    one within ~50 ms used to cut the stop short, and ranks spun on). Elsewhere nothing changes here (the
    stop itself still ignores Ctrl-C: ``_interrupts_deferred``)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    interrupted = False

    def first_only(signum: int, frame: Any) -> None:
        nonlocal interrupted
        if not interrupted:
            interrupted = True
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, first_only)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) is ignored inside: the interruption being handled already stops the run, and a second
    one within ~50 ms used to cut the stop short before every rank got its Aborted. Main thread only (the
    only thread Python delivers signals to); elsewhere, or with no Python-level handler, nothing changes."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def own_copies(obj: Any, memo: dict | None = None) -> Any:
    """``obj`` with every tensor inside lists, tuples and dicts replaced by this rank's own copy, as each
    process of a real backend unpickles its own: one rank's ``x.mul_(10)`` or ``x.grad`` never reaches
    another rank or the caller. ``copy.deepcopy`` per tensor, with one memo per rank: a copy keeps
    ``requires_grad`` and its type (``nn.Parameter``), and views of one tensor stay views of one copy
    (``ts.run`` has refused tensors with autograd history, which neither deepcopy nor pickle take).
    Other objects (modules, functions, events) are passed as they are."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        return copy.deepcopy(obj, memo)
    if isinstance(obj, (list, tuple)):
        items = [own_copies(o, memo) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuples too
    if isinstance(obj, dict):
        return type(obj)((k, own_copies(v, memo)) for k, v in obj.items())
    return obj


_intra_op = {"runs": 0, "threads": 0}  # top-level runs in progress in this process; torch's threads before them
_intra_op_lock = threading.Lock()


@contextmanager
def _one_intra_op_thread(nested: bool) -> Iterator[None]:
    """One torch intra-op thread while any run is in progress: the ranks are the parallelism (world.py's
    RUNNERS of them at once). With torch's default, each runner's ops also start a team of OpenMP
    threads that fight the runners for the cores (64-rank ring attention: 3.4 s instead of 2.5 s on
    2 cores). ``torch.set_num_threads`` sets a global that new threads start from, and the calling
    thread's own setting: so each top-level run puts its own thread's setting back when it ends (the
    first to start saved the global, the last to end restores it), and a nested run, whose rank thread
    already started from 1 and may end after the run it is nested in, changes nothing."""
    if nested:
        yield
        return
    mine = torch.get_num_threads()
    with _intra_op_lock:
        if _intra_op["runs"] == 0:
            _intra_op["threads"] = mine
        _intra_op["runs"] += 1
        torch.set_num_threads(1)
    try:
        yield
    finally:
        with _intra_op_lock:
            _intra_op["runs"] -= 1
            torch.set_num_threads(_intra_op["threads"] if _intra_op["runs"] == 0 else mine)


def _supervise(world: SimWorld, done: SimpleQueue, exited: set[int]) -> None:
    """Wait for every rank to leave, polling the world every POLL s (timeout, stalled turns); once the
    run has failed, stop the ranks."""
    next_poll = time.monotonic() + POLL
    while len(exited) < world.world_size:
        try:
            exited.add(done.get(timeout=max(0.0, next_poll - time.monotonic())))
        except Empty:
            pass
        if time.monotonic() >= next_poll:
            world.poll()
            next_poll = time.monotonic() + POLL
        if world.error is not None:
            _stop(world, done, exited)
            return


def _stop(world: SimWorld, done: SimpleQueue, exited: set[int]) -> None:
    """After the run failed: give the ranks still computing in fn POLL s to reach a Comm call (which
    raises), interrupt those that have not, then wait up to GRACE for all, interrupting again every
    RESEND s the ranks that swallowed their Aborted. Interrupting only the ranks that need it keeps an
    asynchronous Aborted rare: one that lands in a garbage-collector callback (hypothesis registers
    some) is printed and swallowed, and that rank is interrupted again."""
    _collect_exits(done, exited, world.world_size, POLL)
    deadline = time.monotonic() + GRACE
    while len(exited) < world.world_size and time.monotonic() < deadline:
        _interrupt_computing_ranks(world)
        _collect_exits(done, exited, world.world_size, min(RESEND, deadline - time.monotonic()))


def _keep_stopping(world: SimWorld, done: SimpleQueue, exited: set[int]) -> None:
    """Ranks still in fn after ``_stop`` (inside native code, or swallowing their Aborted): a daemon thread
    interrupts them again every RESEND s until the last has left fn, then ends."""
    if len(exited) == world.world_size:
        return

    def keep_stopping() -> None:
        while len(exited) < world.world_size:
            _interrupt_computing_ranks(world)
            _collect_exits(done, exited, world.world_size, RESEND)

    threading.Thread(target=keep_stopping, name="tpsp_sim-stopper", daemon=True).start()


def _interrupt_computing_ranks(world: SimWorld) -> None:
    """Raise Aborted in every rank computing in fn that has none pending: once, then again each time the
    last one landed and the rank is still in fn (it swallowed it). Waiting ranks were woken and raise
    themselves; a rank supervising a nested run (failed with this one) stops its ranks and raises: an
    Aborted could land inside Thread.start there. A rank leaves ``thread_ids`` (under the lock) as it
    leaves fn: from then on it gets none. One whose stop has not landed for QUIET_RESEND s gets another:
    it may still be pending (in native code; the new one replaces it) or have been discarded by C code
    before it was instantiated, which no ``landed`` records (and the rank would spin on)."""
    now = time.monotonic()
    with world.lock:
        for rank, ident in world.thread_ids.items():
            if rank in world.blocked or rank in world.nesting:
                continue
            if rank not in world.aborted or ident in Aborted.landed or now - world.aborted[rank] > QUIET_RESEND:
                Aborted.landed.discard(ident)
                world.aborted[rank] = now
                _async_raise(ident, Aborted)


def _collect_exits(done: SimpleQueue, exited: set[int], world_size: int, seconds: float) -> None:
    """Take the numbers of ranks that leave within ``seconds`` (until all ``world_size`` have).

    Polls (``get_nowait`` and short sleeps) rather than blocking in ``done.get(timeout=...)``: a stop runs
    while Ctrl-C is deferred, and a SIGINT that interrupts SimpleQueue.get's lock wait could leave it
    waiting past its timeout (seen: a double Ctrl-C hung the stop in about 1 run in 5)."""
    deadline = time.monotonic() + seconds
    while len(exited) < world_size:
        try:
            exited.add(done.get_nowait())
            continue
        except Empty:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(STOP_POLL, left))


def _async_raise(ident: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in thread ``ident`` at its next Python instruction; None cancels a pending one."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None if exc is None else ctypes.py_object(exc))
