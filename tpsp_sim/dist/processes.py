"""Real runs of ``ts.run`` (``backend="gloo"`` or ``"nccl"``): one fresh Python process per rank.

``run_processes`` starts them on loopback around a TCPStore held by the caller. ``fn`` and its
arguments travel by cloudpickle, so a function defined in a notebook cell works too; outputs and
traces come back through files in a temporary directory. Under ``torchrun`` the same per-rank code
runs with ``torchrun ... -m tpsp_sim.dist.worker MODULE:FN`` (see worker.py).

Lifetime. No worker outlives its run: when the run ends, however it ends in this process (result,
error, Ctrl-C), the workers still running are killed, and with them every process they started
(each worker leads its own process group; POSIX); when this process itself dies (SIGTERM,
SIGKILL), each worker ends within moments on its own (worker.py, ``_die_with_parent``) and a
watchdog process kills the workers' groups, so the processes they started end too (watchdog.py). The
directory is removed at the end of the run; a process killed before it could do that leaves it
behind, unlocked, and the next real run (in any process) removes it (``_remove_abandoned_work_dirs``).

Blame. The parent watches the processes and their call logs (call_log.py) every 20 ms and stops
the run at the first of:

1. two ranks made different calls at the same step: ``CollectiveMismatchError`` saying what each
   called, as soon as both have called (gloo itself would wait for the timeout);
2. a rank raised in its own code: ``RankFailedError`` of the earliest such rank;
3. a rank's process ended without a result: ``RankFailedError`` with its exit code or signal;
4. the run passed its ``timeout`` (counted from when every process had joined the group):
   ``SimulationError("timeout: ...")`` naming the stalled ranks (those others wait for) and where
   each rank was; or, before that, the ranks that had not started (loaded fn) within
   ``timeout + STARTUP_S`` seconds of the run's start;
5. a call into ``torch.distributed`` failed and nothing above explains it within a second: that
   rank's error.

And as soon as it shows: a rank whose last call waits for a rank that has already returned from fn
is a ``DeadlockError`` (gloo would wait for the whole timeout; the simulator says the same).

Once every rank has returned, an isend or irecv one side posted and the other never did is an error
too (``unmatched_messages``, the simulator's text): gloo would let it pass.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import cloudpickle
import torch.distributed as dist

from ..core.errors import RankFailedError, SimulationError, rank_failed, unmatched_messages
from ..core.result import RunResult
from ..core.trace import CommTrace
from .call_log import CallBook

try:
    import fcntl  # POSIX: a lock the kernel releases when its holder dies
except ImportError:  # Windows: directories are removed at the end of each run only
    fcntl = None

POLL_S = 0.02  # how often the parent looks at its workers
GRACE_S = 1.0  # how long a failure inside torch.distributed waits for a better explanation
STARTUP_S = 60.0  # allowance for starting Python and importing torch, on top of the timeout
OWNER_ENV = "TPSP_SIM_RUN_OWNER"  # set to the pid of ts.run's process in every worker, inherited by its children
_PREFIX = "tpsp_sim-"
_LOCK = "owner.lock"


def run_processes(fn: Callable, args: tuple, kwargs: dict, world_size: int, backend: str,
                  timeout: float, wrap: Callable[[Callable], Callable] = lambda fn: fn) -> RunResult:
    """Run ``wrap(fn)`` on ``world_size`` new processes of ``backend``; raise the failure to blame (module docstring)."""
    try:
        payload = cloudpickle.dumps((wrap(fn), args, kwargs))
    except Exception as error:
        raise TypeError(f"ts.run(backend={backend!r}) could not serialize fn={fn!r} or its arguments to send them "
                        f"to the worker processes ({error}). Define fn at module level in an importable file, "
                        f"or in a notebook cell, and pass plain tensors and numbers.") from error
    _remove_abandoned_work_dirs()
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    with _work_dir() as work:
        (work / "payload.pkl").write_bytes(payload)
        (work / "sys_path.json").write_text(json.dumps(sys.path))  # where fn's module is found
        procs, parent_pipe, watchdog = _start(work, world_size, backend, store.port, timeout)
        try:
            failure = _watch(procs, work, timeout)
        finally:
            _kill(procs)
            _release(watchdog)
            os.close(parent_pipe)
        for rank in range(world_size):
            for line in (work / f"stdout{rank}").read_text(errors="replace").splitlines():
                print(f"[rank {rank}] {line}")
        if failure is not None:
            raise failure
        results = [cloudpickle.loads((work / f"result{rank}.pkl").read_bytes()) for rank in range(world_size)]
    return RunResult([r[0] for r in results], CommTrace.from_recorders([r[1] for r in results]))


def _start(work: Path, world_size: int, backend: str, port: int,
           timeout: float) -> tuple[list[subprocess.Popen], int, subprocess.Popen | None]:
    """Start the watchdog, then one worker per rank, each told to the watchdog; return the workers, the write
    end of the pipe they watch (close it to end them) and the watchdog (None without process groups)."""
    watchdog = None
    if hasattr(os, "killpg"):
        watchdog = subprocess.Popen([sys.executable, "-I", "-S", str(Path(__file__).with_name("watchdog.py"))],
                                    stdin=subprocess.PIPE, text=True, start_new_session=True)
    read_end, write_end = os.pipe()  # only the workers inherit the read end; only this process holds the write end
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), OWNER_ENV: str(os.getpid())}
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(world_size):
            cmd = [sys.executable, "-m", "tpsp_sim.dist.worker", "--worker", str(work), "--rank", str(rank),
                   "--world-size", str(world_size), "--backend", backend, "--port", str(port),
                   "--timeout", str(timeout), "--start-timeout", str(timeout + STARTUP_S),
                   "--parent-pid", str(os.getpid()), "--parent-pipe", str(read_end)]
            with open(work / f"stdout{rank}", "wb") as out, open(work / f"stderr{rank}", "wb") as err:
                procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=err, pass_fds=(read_end,),
                                              start_new_session=watchdog is not None))
            _tell(watchdog, f"{procs[-1].pid}\n")  # the worker leads a group of that id
    except BaseException:
        _kill(procs)
        _release(watchdog)
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return procs, write_end, watchdog


def _watch(procs: list[subprocess.Popen], work: Path, timeout: float) -> BaseException | None:
    """Wait until every worker has its result (None) or there is a failure to blame (returned)."""
    world_size = len(procs)
    book = CallBook([work / f"calls{rank}" for rank in range(world_size)])
    errors: dict[int, tuple[BaseException, bool]] = {}  # rank -> (its exception, raised by torch.distributed)
    seen_at: dict[int, float] = {}  # rank -> when its error was seen
    started = time.time()
    done_at = None
    while True:
        codes = [p.poll() for p in procs]  # before the files: a process writes them before it exits
        book.read()
        mismatch = book.mismatch()
        if mismatch is not None:
            return mismatch
        for rank in range(world_size):
            path = work / f"error{rank}.pkl"
            if rank not in errors and path.exists():
                errors[rank] = cloudpickle.loads(path.read_bytes())
                seen_at[rank] = time.time()
        own = [rank for rank, (_, by_comm) in errors.items() if not by_comm]
        if own:
            rank = min(own, key=lambda r: (seen_at[r], r))
            return rank_failed(rank, errors[rank][0])
        results = [(work / f"result{rank}.pkl").exists() for rank in range(world_size)]
        if any(results) and not all(results):
            book.read()  # the calls logged before those results were written
            waiting = book.waits_for_returned([rank for rank in range(world_size) if results[rank]])
            if waiting is not None:
                return waiting
        died = [rank for rank in range(world_size) if codes[rank] is not None and not results[rank]
                and rank not in errors]
        if died:
            return _died(died[0], codes[died[0]], work, book)
        now = time.time()
        if all(results):  # every rank returned; give the processes a moment to leave the group
            book.read()  # every call was logged before its rank's result was written
            mismatch, unmatched = book.mismatch(), book.unmatched()
            if mismatch is not None or unmatched:
                return mismatch or unmatched_messages(unmatched)
            done_at = done_at or now
            if all(code is not None for code in codes) or now - done_at > GRACE_S:
                return None
        deadline = (max(book.joined_at.values()) + timeout if len(book.joined_at) == world_size
                    else started + timeout + STARTUP_S)
        if now > deadline:
            # a rank whose collective has just timed out inside gloo still counts as waiting in it
            unfinished = [rank for rank in range(world_size) if not results[rank]]
            if len(book.joined_at) < world_size:
                return _not_started(unfinished, timeout, book)
            return _timed_out(unfinished, timeout, book)
        if errors and (now - min(seen_at.values()) > GRACE_S or all(code is not None for code in codes)):
            rank = min(errors, key=lambda r: (seen_at[r], r))
            return rank_failed(rank, errors[rank][0])
        time.sleep(POLL_S)


def _died(rank: int, code: int, work: Path, book: CallBook) -> RankFailedError:
    how = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    err = (work / f"stderr{rank}").read_text(errors="replace")[-2000:]
    return RankFailedError(rank, f"rank {rank}'s process {how} {book.where(rank)}, without a result"
                                 + (f"; its stderr ends:\n{err}" if err else ""))


def _not_started(running: list[int], timeout: float, book: CallBook) -> SimulationError:
    late = [rank for rank in running if rank not in book.started]
    waiting = f"ranks {', '.join(map(str, sorted(book.started)))} waited" if book.started else "no rank waited"
    if not late:
        return SimulationError(f"timeout: every rank started, but the process group did not form within "
                               f"{timeout + STARTUP_S:g} s")
    return SimulationError(f"timeout: rank(s) {', '.join(map(str, late))} had not started after "
                           f"{timeout + STARTUP_S:g} s (starting Python, importing torch, loading fn); {waiting}")


def _timed_out(running: list[int], timeout: float, book: CallBook) -> SimulationError:
    blamed, where = book.stalled(running)  # the waiting ranks are never blamed
    ranks = f"rank{'s' if len(blamed) > 1 else ''} {', '.join(map(str, blamed))}"
    if not blamed:
        verdict = "every running rank waits for another: their calls do not pair up"
    elif len(blamed) == len(running):
        verdict = f"{ranks} {'were' if len(blamed) > 1 else 'was'} still computing; no rank waited in a call"
    else:
        verdict = f"{ranks} stalled: the other ranks wait for {'them' if len(blamed) > 1 else 'it'}"
    return SimulationError(f"timeout: the run passed its timeout of {timeout:g} s (counted from when every "
                           f"process had joined the group); {verdict}:\n{where}")


def _kill(procs: list[subprocess.Popen]) -> None:
    """Kill every worker and every process it started: each worker leads its own process group (session),
    which its children join unless they leave it themselves."""
    for p in procs:
        if hasattr(os, "killpg"):
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the group outlives its leader while a member lives
            except (ProcessLookupError, PermissionError):  # no member left
                pass
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def _tell(watchdog: subprocess.Popen | None, line: str) -> None:
    """Send the watchdog a line; one that has ended (killed by someone) no longer guards the run, which goes on."""
    if watchdog is not None:
        try:
            watchdog.stdin.write(line)
            watchdog.stdin.flush()
        except OSError:
            pass


def _release(watchdog: subprocess.Popen | None) -> None:
    """Tell the watchdog that the workers were ended here (it then exits without killing) and reap it."""
    if watchdog is None:
        return
    _tell(watchdog, "done\n")
    try:
        watchdog.stdin.close()
    except OSError:
        pass
    watchdog.wait()


@contextmanager
def _work_dir() -> Iterator[Path]:
    """A fresh temporary directory, removed on exit; while this process lives it holds ``owner.lock``.

    The lock is taken on a file under another name and then renamed into place, so a directory is
    never seen with an unlocked ``owner.lock`` while its run is alive.
    """
    path = Path(tempfile.mkdtemp(prefix=_PREFIX))
    lock = open(path / f"{_LOCK}.part", "wb")  # noqa: SIM115 - held for the run, closed below
    try:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
            os.replace(path / f"{_LOCK}.part", path / _LOCK)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        lock.close()


def _remove_abandoned_work_dirs() -> None:
    """Remove the directories of runs whose process died before removing them (their lock is free)."""
    if fcntl is None:
        return
    for lock_path in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*/{_LOCK}"):
        try:
            with open(lock_path, "rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(lock_path.parent, ignore_errors=True)
        except OSError:  # held by a live run, removed meanwhile, or another user's
            continue
