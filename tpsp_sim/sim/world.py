"""The shared state of one simulated run: who runs, who waits for what.

Turns. Every rank's Python shares one GIL, and a rank releases it for each torch op: with tens of
runnable rank threads every op hands the GIL to another thread, and the run spends its time in the
kernel switching threads (64 ranks of ring attention: 11 s wall, 7-12 s of it system time). So
ranks take turns: at most ``runners`` run at once, the others wait on their own gate. RUNNERS is
two: one rank's Python runs while another's torch kernel runs without the GIL, and more runnable
threads would only fight over it. A rank gives up its turn only when it must wait (or leaves fn),
and hands it to the first rank of the ``ready`` queue: one thread wake-up per hand-off. A rank that
waits outside the runtime (``time.sleep``, an ``Event``, a nested run) must not stall the others:
each poll of the supervisor that finds no hand-off since the last while ranks are ready, and a
running rank idle (almost no CPU used meanwhile), admits one more runner; once turns move again
it is back to RUNNERS.

Waiting. A rank that must wait registers *what* it waits for (a predicate) in ``blocked`` and
sleeps on its gate, outside the world lock. Whoever makes a predicate true moves exactly the ranks
concerned from ``asleep`` to ``ready``: completing a collective the ranks of that call, matching a
message its two ends. So a rank in ``asleep`` is one whose predicate was false when it registered
and that nobody has woken since: its predicate is still false, and only a running or ready rank can
make it true. When every live rank is in ``asleep`` (each wait is tested again, as the definition
demands), no rank can ever progress: that is a deadlock, and it is reported then and only then. A
rank whose message has already arrived is not stuck.

A collective is a rendezvous: each rank of the group posts its input to the slot for that
group's next call; the last to arrive checks that all ranks called the same thing (op, shape,
dtype, device, arguments), computes every rank's output outside the lock (reducing in rank order,
so runs are bitwise reproducible) and wakes the others. Posted with ``async_op=True``
(``collective(..., wait=False)``) a rank posts and goes on; ``wait_collective`` later waits for the
outputs like any other wait (so a wait for a call some rank has not posted takes part in deadlock
detection), and a call still missing ranks when the run ends is reported then (``unmatched``). A
``send`` is matched with the next ``recv`` on the same (group, src, dst) channel, in order, like
NCCL; a blocking send returns only once matched, so ring-ordering deadlocks show up here.

Failure: ``fail`` records the run's first error and gives every waiting rank a turn, in which it
raises (and fails the runs nested inside this one's ranks); every later call into the world raises
a copy of that error, and once the run has ended (``close``) every call raises at once, whoever
makes it.
"""

from __future__ import annotations

import _thread
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import _disable_current_modes

from ..core.errors import (MAX_LINES, CollectiveMismatchError, DeadlockError, RankFailedError, SimulationError,
                           format_ranks, group_text, rank_failed, unmatched_messages)
from ..core.ops import describe_call
from ..core.trace import Recorder

RUNNERS = 2  # ranks that run at once while turns keep moving (see "Turns" above)
RECHECKS_PER_S = 100  # spare wake-ups of sleeping ranks per second, all ranks together (``SimWorld.recheck``)
IDLE_CPU = 0.001  # CPU seconds under which a running rank counts as waiting between two polls


class Aborted(BaseException):
    """Raised inside a rank thread (asynchronously) to stop it after its run has already failed.

    Raised as a class, so CPython makes the instance in the rank's own thread when an ``except``
    catches it: ``landed`` then holds that thread's ident (the runtime clears it before each send).
    A rank whose Aborted landed and that still runs fn has swallowed it (a bare ``except:``). One
    that C code discards before anything catches it (``PyObject_HasAttr`` and pybind11's ``hasattr``
    clear every error raised in a Python ``__getattr__`` or property) is never instantiated, so it
    leaves no trace here: the runtime sends those ranks another after a while (``QUIET_RESEND``)."""

    landed: set[int] = set()

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        Aborted.landed.add(threading.get_ident())


def copy_error(error: SimulationError) -> SimulationError:
    """A fresh instance for each rank thread to raise (threads must not share one traceback)."""
    if isinstance(error, RankFailedError):
        return rank_failed(error.rank, error.__cause__) if error.__cause__ is not None else RankFailedError(error.rank, str(error))
    return type(error)(str(error))


def detached(x: torch.Tensor) -> torch.Tensor:
    """``x`` without autograd history (``detach`` only when needed: it is not free, called per rank per call)."""
    return x.detach() if x.requires_grad else x


def summarise(lines: dict[int, str]) -> str:
    """One line per distinct text, naming the ranks that share it; at most MAX_LINES lines."""
    by_text: dict[str, list[int]] = {}
    for rank in sorted(lines):
        by_text.setdefault(lines[rank], []).append(rank)
    out = [f"  {'rank' if len(ranks) == 1 else 'ranks'} {format_ranks(ranks)}: {text}"
           for text, ranks in by_text.items()]
    if len(out) > MAX_LINES:
        rest = [r for ranks in list(by_text.values())[MAX_LINES - 1:] for r in ranks]
        out = out[:MAX_LINES - 1] + [f"  ... and {len(rest)} more ranks ({format_ranks(rest)}), "
                                     f"{len(out) - MAX_LINES + 1} different states"]
    return "\n".join(out)


def scope_text(scope: str) -> str:
    return f" in scope {scope!r}" if scope else ""


class _Slot:
    """One call of a collective on one group: what each rank posted, then what each gets back."""

    __slots__ = ("posted", "waiters", "outputs", "missing")

    def __init__(self) -> None:
        self.posted: dict[int, tuple[str, torch.Tensor | None, tuple, str]] = {}  # group rank -> (op, x, params, scope)
        self.waiters: list[int] = []  # global ranks asleep on this slot
        self.outputs: list[Any] | None = None
        self.missing: tuple[int, str] = (-1, "")  # (ranks posted, the ranks that have not) when last described


class PostedCall:
    """A collective this rank posted without waiting (``SimWorld.collective(..., wait=False)``)."""

    __slots__ = ("slot", "call")

    def __init__(self, slot: _Slot, call: int, op: str, x: torch.Tensor | None, params: tuple) -> None:
        self.slot = slot
        self.call = (call, op, x, params)  # what ``_describe_slot`` names, should its wait deadlock


class _Message:
    """One posted send or receive on a channel."""

    __slots__ = ("tensor", "like", "scope", "matched", "waiter")

    def __init__(self, scope: str, tensor: torch.Tensor | None = None, like: torch.Tensor | None = None) -> None:
        self.tensor = tensor
        self.like = like
        self.scope = scope
        self.matched = False
        self.waiter: int | None = None  # global rank asleep on this message


def _cpu_seconds(thread_ident: int) -> float:
    """CPU time a thread has used; 0 where the platform cannot tell (then it always counts as idle)."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread_ident))
    except (AttributeError, OSError):  # no pthread_getcpuclockid (macOS, Windows), or the thread has ended
        return 0.0


def _locked_gate() -> Any:
    gate = _thread.allocate_lock()
    gate.acquire()
    return gate


class SimWorld:
    """The shared state of one simulated run."""

    def __init__(self, recorders: list[Recorder], timeout: float | None) -> None:
        self.world_size = len(recorders)
        self.recorders = recorders
        # Enter the C-level lock (`with world.lock`): an Aborted raised into a thread then cannot land
        # between acquiring the lock and the `with` that releases it. Nothing sleeps holding it.
        self.lock = threading.Lock()
        self.gates = [_locked_gate() for _ in range(self.world_size)]
        self.groups: list[tuple[int, ...]] = [tuple(range(self.world_size))]
        self._group_labels: dict[int, str] = {}  # group id -> group_text(group), formatted once
        self.slots: dict[tuple[int, int], _Slot] = {}
        self.calls: dict[tuple[int, int], int] = {}  # (group id, global rank) -> calls made so far
        self.sends: dict[tuple[int, int, int], deque[_Message]] = {}  # (group id, src, dst) -> unmatched
        self.recvs: dict[tuple[int, int, int], deque[_Message]] = {}
        self.blocked: dict[int, tuple[Callable[[], bool], Callable[[], str]]] = {}  # rank -> (ready, describe)
        self.asleep: set[int] = set()  # blocked ranks not woken since their predicate was last false
        self.ready: deque[int] = deque()  # blocked ranks whose wait is over, in the order they get a turn
        self.running: set[int] = set()  # ranks that hold a turn
        self.runners = RUNNERS  # how many may hold one now (the supervisor raises it when turns stall)
        self.handoffs = 0  # turns given so far
        self._handoffs_seen = 0  # ... at the supervisor's last poll
        self._cpu_seen: dict[int, float] = {}  # running rank -> its CPU seconds at the supervisor's last poll
        self.finished: set[int] = set()  # ranks that have left fn
        self.children: list[SimWorld] = []  # runs nested inside this run's ranks
        self.nesting: set[int] = set()  # ranks supervising a nested run (they stop when it stops)
        self.thread_ids: dict[int, int] = {}  # rank -> thread ident, while the rank is inside fn
        self.aborted: dict[int, float] = {}  # rank -> when it was last sent an Aborted (runtime.py)
        self.error: SimulationError | None = None
        self.closed = False
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        # Seconds between a sleeping rank's spare checks (``_sleep``): at most RECHECKS_PER_S wake-ups a
        # second in all. One second each made every sleeping rank wake each second: 8,000 ranks spent the
        # run fighting for the GIL (one all_reduce: 52 s on 8,000 ranks, 3.6 s on 4,000).
        self.recheck = max(1.0, self.world_size / RECHECKS_PER_S)

    def group_label(self, group_id: int) -> str:
        """``group_text`` of a group, formatted once per group (not once per rank: O(world_size) each)."""
        label = self._group_labels.get(group_id)
        if label is None:
            label = self._group_labels[group_id] = group_text(self.groups[group_id])
        return label

    # ---- failure and the end of the run -------------------------------------------------------------

    def fail(self, error: SimulationError) -> None:
        """Record the run's first error, wake every rank so each raises it, fail nested runs. Lock held."""
        if self.error is None:
            self.error = error
        self._release_waiting()
        for child in self.children:
            with child.lock:
                child.fail(SimulationError(f"the enclosing run failed: {error}"))

    def adopt(self, child: "SimWorld", rank: int) -> None:
        """Register a run started inside ``rank`` of this run: it fails when this run fails."""
        with self.lock:
            self.children.append(child)
            self.nesting.add(rank)
            if self.error is not None or self.closed:
                with child.lock:
                    child.fail(SimulationError(f"the enclosing run has already "
                                               f"{'failed' if self.error else 'ended'}"))

    def disown(self, child: "SimWorld", rank: int) -> None:
        """The run nested in ``rank`` has ended. Once this run has failed, ``rank`` stays out of the runtime's
        Aborted stops: it is raising the nested run's error (an Aborted there could cut that run's cleanup)."""
        with self.lock:
            self.children.remove(child)
            if self.error is None:
                self.nesting.discard(rank)

    def close(self) -> None:
        """The run has returned: every later call on its comms raises at once."""
        with self.lock:
            self.closed = True
            self._release_waiting()

    def _release_waiting(self) -> None:
        """Every waiting rank gets a turn, finds the run failed or closed and raises. Lock held.

        In turns, RUNNERS more than the ranks running now (which may be stuck in native code): opening
        every gate at once had thousands of threads fight for the GIL and the lock, and starved the
        supervisor (a deadlock of 8,000 ranks took 5 to 44 s to report after it was found). Until its turn
        a rank stays in ``blocked`` (in the runtime, never sent an Aborted)."""
        self.ready.extend(sorted(self.asleep))
        self.asleep.clear()
        self.runners = len(self.running) + RUNNERS
        self._hand_over()

    def check_usable(self, rank: int) -> None:
        """Raise if the run has failed or ended (read without the lock: both flags only ever turn on)."""
        if self.error is not None:
            raise copy_error(self.error)
        if self.closed:
            raise SimulationError(
                f"rank {rank}: this comm belongs to a ts.run that has already returned; a comm (and a "
                f"layer holding one) works only inside the fn of its own run, so build it there")

    def poll(self) -> None:
        """The supervisor's periodic check: fail the run once it has passed its timeout; admit one more
        runner while ranks are ready, no turn has moved since the last poll, and a running rank used
        almost no CPU meanwhile (it waits outside the runtime: a sleep, an Event, a nested run)."""
        with self.lock:
            if self.error is None and self.deadline is not None and time.monotonic() > self.deadline:
                self.fail(SimulationError(f"the run passed its timeout of {self.timeout} s; "
                                          f"ranks:\n{self.describe_ranks()}"))
            cpu = {r: _cpu_seconds(self.thread_ids[r]) for r in self.running if r in self.thread_ids}
            idle = any(cpu[r] - self._cpu_seen[r] < IDLE_CPU for r in cpu if r in self._cpu_seen)
            if self.handoffs != self._handoffs_seen and self.error is None:  # after a failure, turns stay as
                self.runners = RUNNERS  # _release_waiting set them: beyond the ranks stuck in native code
            elif self.ready and idle:
                self.runners += 1
                self._hand_over()
            self._handoffs_seen, self._cpu_seen = self.handoffs, cpu

    def enter(self, rank: int) -> None:
        """``rank``'s thread is about to call fn: wait for its first turn (raise instead if the run has failed)."""
        with self.lock:
            self.check_usable(rank)
            self.blocked[rank] = (lambda: True, lambda: "its first turn")
            self.ready.append(rank)
            self._hand_over()
        self._sleep(rank)
        with self.lock:
            self.thread_ids[rank] = threading.get_ident()

    def rank_done(self, rank: int) -> None:
        """``rank`` has left fn (returned or raised): from now on nothing interrupts its thread."""
        with self.lock:
            self.thread_ids.pop(rank, None)
            self.finished.add(rank)
            self.running.discard(rank)
            self._hand_over()
            self._check_deadlock()

    def describe_ranks(self) -> str:
        """What every rank is doing, identical ranks summarised. Lock held."""
        lines, ready = {}, set(self.ready)
        for rank in range(self.world_size):
            if rank in ready:
                lines[rank] = "is ready, waiting for its turn to run"
            elif rank in self.blocked:
                lines[rank] = f"waits in {self.blocked[rank][1]()}"
            elif rank in self.finished:
                lines[rank] = "has returned from fn"
            else:
                lines[rank] = "running fn" + scope_text(self.recorders[rank].scope)
        return summarise(lines)

    # ---- waiting ------------------------------------------------------------------------------------

    def _raise_if_failed(self, rank: int) -> None:
        """Lock held."""
        if self.error is not None or self.closed:
            self.blocked.pop(rank, None)
            self.asleep.discard(rank)
            self.check_usable(rank)

    def _block(self, rank: int, ready: Callable[[], bool], describe: Callable[[], str]) -> None:
        """Register that ``rank`` waits for ``ready()`` (false now), give its turn to the next ready rank
        and check for deadlock. Lock held; ``_sleep`` (lock not held) follows."""
        self.blocked[rank] = (ready, describe)
        self.asleep.add(rank)
        self.running.discard(rank)
        self._hand_over()
        self._check_deadlock()
        self._raise_if_failed(rank)

    def _sleep(self, rank: int) -> None:
        """Sleep on this rank's gate until it is given a turn (its wait is over). Lock NOT held."""
        gate = self.gates[rank]
        while True:
            gate.acquire(timeout=self.recheck)  # given a turn, or the spare check is due
            if rank not in self.blocked:  # _hand_over gave it a turn: to go on, or to raise the run's failure
                if self.error is not None or self.closed:
                    self.check_usable(rank)
                return
            with self.lock:
                self._raise_if_failed(rank)
                if rank in self.asleep and self.blocked[rank][0]():  # a spare check, never needed: whoever
                    self._wake(rank)  # ends a wait wakes its rank

    def _wake(self, rank: int) -> None:
        """``rank``'s wait is over: queue it for a turn (if it sleeps). Lock held."""
        if rank in self.asleep:
            self.asleep.discard(rank)
            self.ready.append(rank)
            self._hand_over()

    def _hand_over(self) -> None:
        """Give free turns to ready ranks, first come first served. Lock held."""
        while self.ready and len(self.running) < self.runners:
            rank = self.ready.popleft()
            if rank not in self.blocked:  # it raised meanwhile (the run failed: a spare check found it)
                continue
            del self.blocked[rank]
            self.running.add(rank)
            self.handoffs += 1
            self._open(rank)

    def _open(self, rank: int) -> None:
        gate = self.gates[rank]
        if gate.locked():  # else it is open already, and the rank re-checks after passing it
            gate.release()

    def _check_deadlock(self) -> None:
        """Fail with DeadlockError if every live rank sleeps and no wait can be satisfied. Lock held."""
        if self.error is not None or not self.asleep or len(self.asleep) + len(self.finished) < self.world_size:
            return
        if any(self.blocked[rank][0]() for rank in self.asleep):
            return
        self.fail(DeadlockError("every live rank is blocked and none can progress:\n" + self.describe_ranks()))

    # ---- collectives ----------------------------------------------------------------------------

    def collective(self, comm: Any, op: str, x: torch.Tensor | None, params: tuple,
                   compute: Callable[[list], list], wait: bool = True) -> Any:
        """Post this rank's input for the group's next call and return this rank's output; with
        ``wait=False`` return at once a ``PostedCall``, whose output ``wait_collective`` returns.

        Posting is what orders the calls of a group (a mismatch is caught when the last rank posts); the
        outputs are computed once, by the last rank to post, whether or not the others wait yet."""
        me, gid, size = comm.global_rank, comm.group_id, comm.world_size
        with self.lock:
            self._raise_if_failed(me)
            call = self.calls.get((gid, me), 0)
            self.calls[gid, me] = call + 1
            slot = self.slots.get((gid, call))
            if slot is None:
                slot = self.slots[gid, call] = _Slot()
            slot.posted[comm.rank] = (op, None if x is None else detached(x), params, comm.recorder.scope)
            last = len(slot.posted) == size
            if last:
                self._check_signatures(comm, slot, call)
                del self.slots[gid, call]  # every rank has posted: nobody looks it up again
            elif wait:
                slot.waiters.append(me)
                self._block(me, lambda: slot.outputs is not None,
                            lambda: self._describe_slot(comm, slot, call, op, x, params))
        if not last:
            if not wait:
                return PostedCall(slot, call, op, x, params)
            self._sleep(me)
            return slot.outputs[comm.rank]
        inputs = [slot.posted[r][1] for r in range(size)]  # detached: no autograd graph is built
        if torch._C._len_torch_dispatch_stack():  # e.g. a rank's FlopCounterMode: not the rank's own work
            with _disable_current_modes():
                outputs = compute(inputs)
        else:
            outputs = compute(inputs)
        with self.lock:
            self._raise_if_failed(me)
            slot.outputs = outputs
            for rank in slot.waiters:
                self._wake(rank)
        return outputs[comm.rank] if wait else PostedCall(slot, call, op, x, params)

    def wait_collective(self, comm: Any, posted: "PostedCall") -> Any:
        """This rank's output of a call it posted with ``wait=False``, once every rank of the group has posted
        it (a rank waiting for a call that some rank never posts is part of a deadlock, reported as one)."""
        me, slot = comm.global_rank, posted.slot
        if slot.outputs is not None:  # set under the lock, never reset
            self.check_usable(me)
            return slot.outputs[comm.rank]
        with self.lock:
            self._raise_if_failed(me)
            if slot.outputs is None:
                slot.waiters.append(me)
                self._block(me, lambda: slot.outputs is not None,
                            lambda: "wait() of " + self._describe_slot(comm, slot, *posted.call))
                asleep = True
            else:
                asleep = False
        if asleep:
            self._sleep(me)
        return slot.outputs[comm.rank]

    def _check_signatures(self, comm: Any, slot: _Slot, call: int) -> None:
        """Every rank of the group must have called the same op on the same shape, dtype, device. Lock held."""
        def signature(op, x, params, scope):
            return op, None if x is None else (tuple(x.shape), x.dtype, x.device), params
        if len({signature(*posted) for posted in slot.posted.values()}) == 1:
            return
        devices = {posted[1].device for posted in slot.posted.values() if posted[1] is not None}
        lines = {}
        for r, (op, x, params, scope) in slot.posted.items():
            on = f" on {x.device}" if len(devices) > 1 and x is not None else ""
            lines[r] = describe_call(op, x, params) + on + scope_text(scope)
        self.fail(CollectiveMismatchError(f"ranks of group {group_text(comm.group)} made different calls at "
                                          f"collective #{call} of the group:\n{summarise(lines)}"))
        self._raise_if_failed(comm.global_rank)

    def _describe_slot(self, comm: Any, slot: _Slot, call: int, op: str, x, params) -> str:
        """Lock held. The ranks missing are found once per slot and state (``posted`` only grows), not once
        per waiting rank: describing a deadlock of 8,000 ranks was quadratic."""
        if slot.missing[0] != len(slot.posted):
            slot.missing = (len(slot.posted), format_ranks(r for r in range(comm.world_size) if r not in slot.posted))
        return (f"{describe_call(op, x, params)}, collective #{call} of group {self.group_label(comm.group_id)}, "
                f"for group ranks [{slot.missing[1]}] that have not called it{scope_text(slot.posted[comm.rank][3])}")

    # ---- point to point -------------------------------------------------------------------------

    def unmatched(self) -> SimulationError | None:
        """After every rank returned: the isends and irecvs never matched (never waited on either, or the
        run would have deadlocked), as an error (``unmatched_messages``); None if there are none."""
        messages = [(src, dst, sending, tuple(x.shape), str(x.dtype), m.scope)
                    for sending, channels in ((True, self.sends), (False, self.recvs))
                    for (_, src, dst), queue in channels.items() for m in queue
                    for x in [m.tensor if sending else m.like]]
        messages.sort(key=lambda message: (not message[2], message[0], message[1]))  # as dist/call_log.py lists them
        if messages:
            return unmatched_messages(messages)
        return self._uncompleted_collectives()

    def _uncompleted_collectives(self) -> SimulationError | None:
        """After every rank returned: the calls posted with async_op=True (and not waited on: that would have
        deadlocked) that some rank of their group never made, as an error naming both; None if there are none.
        A call every rank posted is complete, waited on or not (its result is simply never read)."""
        if not self.slots:
            return None
        posted: dict[int, list[str]] = {}
        for (gid, call), slot in sorted(self.slots.items()):
            group = self.groups[gid]
            missing = format_ranks(group[r] for r in range(len(group)) if r not in slot.posted)
            for r, (op, x, params, scope) in slot.posted.items():
                posted.setdefault(group[r], []).append(
                    f"posted {describe_call(op, x, params)} (async_op=True), collective #{call} of group "
                    f"{self.group_label(gid)}, which ranks [{missing}] never called{scope_text(scope)}")
        lines = {rank: "; ".join(texts) for rank, texts in posted.items()}
        return CollectiveMismatchError(f"the run ended with {len(self.slots)} asynchronous collective(s) that not "
                                       f"every rank of the group called (and nobody waited on: that would have "
                                       f"deadlocked):\n{summarise(lines)}")

    def post(self, comm: Any, peer: int, message: _Message, sending: bool) -> None:
        """Post a send (to ``peer``) or a receive (from ``peer``) and match it if the other side is there."""
        with self.lock:
            self._raise_if_failed(comm.global_rank)
            self._post(comm, peer, message, sending)

    def _post(self, comm: Any, peer: int, message: _Message, sending: bool) -> None:
        """Lock held."""
        me, other = comm.global_rank, comm.group[peer]
        key = (comm.group_id, me, other) if sending else (comm.group_id, other, me)
        waiting = (self.recvs if sending else self.sends).get(key)
        if not waiting:
            (self.sends if sending else self.recvs).setdefault(key, deque()).append(message)
            return
        send, recv = (message, waiting.popleft()) if sending else (waiting.popleft(), message)
        x, like = send.tensor, recv.like
        if x.shape != like.shape or x.dtype != like.dtype or x.device != like.device:
            on = (f" on {like.device}", f" on {x.device}") if x.device != like.device else ("", "")
            self.fail(CollectiveMismatchError(
                f"rank {key[2]}{scope_text(recv.scope)} receives a tensor of shape {tuple(like.shape)} "
                f"({like.dtype}){on[0]} from rank {key[1]}, which sends shape {tuple(x.shape)} ({x.dtype}){on[1]}"
                f"{scope_text(send.scope)}"))
            self._raise_if_failed(me)
        recv.tensor = x
        send.matched = recv.matched = True
        for m in (send, recv):  # wake a waiter only if this match completes its wait (sendrecv waits for two)
            if m.waiter in self.asleep and self.blocked[m.waiter][0]():
                self._wake(m.waiter)

    def wait_messages(self, comm: Any, messages: list[tuple[int, _Message, bool]]) -> None:
        """Wait until every (peer, message, sending) posted by this rank is matched."""
        me = comm.global_rank
        ready = lambda: all(m.matched for _, m, _ in messages)
        if ready():  # matched under the lock by the other side; `matched` never turns back to False
            return
        describe = lambda: " and ".join(_describe_message(comm, *pms) for pms in messages if not pms[1].matched)
        with self.lock:
            self._raise_if_failed(me)
            if ready():
                return
            for _, m, _ in messages:
                m.waiter = me
            self._block(me, ready, describe)
        self._sleep(me)

    def sendrecv(self, comm: Any, send: _Message, dst: int, recv: _Message, src: int) -> None:
        """Post a send and a receive together and wait for both (one lock hold, at most one sleep)."""
        me = comm.global_rank
        ready = lambda: send.matched and recv.matched
        messages = [(dst, send, True), (src, recv, False)]
        describe = lambda: " and ".join(_describe_message(comm, *pms) for pms in messages if not pms[1].matched)
        with self.lock:
            self._raise_if_failed(me)
            self._post(comm, dst, send, True)
            self._post(comm, src, recv, False)
            if ready():
                return
            send.waiter = recv.waiter = me
            self._block(me, ready, describe)
        self._sleep(me)


def _describe_message(comm: Any, peer: int, message: _Message, sending: bool) -> str:
    x = message.tensor if sending else message.like
    what = f"send to rank {comm.group[peer]}" if sending else f"recv from rank {comm.group[peer]}"
    return (f"{what} (shape {tuple(x.shape)}, {x.dtype}) with no matching {'recv' if sending else 'send'} "
            f"posted{scope_text(message.scope)}")
