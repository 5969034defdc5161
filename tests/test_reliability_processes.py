"""Issue 24 item 5 on gloo: a rank waiting for a rank that has returned is a DeadlockError at once (as on the
simulator), and no process a worker started outlives the run; the autouse fixture sees such processes."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import child_processes
from test_dist_reliability import alive

import tpsp_sim as ts
from tpsp_sim.dist import processes


def rank0_returns_early(comm, how):
    if comm.rank == 1:
        if how == "all_reduce":
            comm.all_reduce(torch.ones(2))
        else:
            comm.recv(torch.ones(2), 0)
    return comm.rank


WAITS = {"all_reduce": "all_reduce(shape=(2,), dtype=torch.float32, op='sum'), collective #0 of group (0, 1), "
                       "for rank(s) 0",
         "recv": "recv(shape=(2,), dtype=torch.float32, src=0), message #0 from rank 0 to rank 1, for rank(s) 0"}


@pytest.mark.real
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["all_reduce", "recv"])
def test_on_gloo_a_rank_waiting_for_a_returned_rank_is_a_deadlock_at_once(how):
    with pytest.raises(ts.DeadlockError) as sim:
        ts.run(rank0_returns_early, how, world_size=2)
    assert "rank 0: has returned from fn" in str(sim.value)
    start = time.monotonic()
    with pytest.raises(ts.DeadlockError) as info:
        ts.run(rank0_returns_early, how, world_size=2, backend="gloo", timeout=100)
    assert time.monotonic() - start < 30  # starting two processes; the timeout is 100 s
    assert str(info.value) == ("a rank waits for a rank that has already returned from fn, so its call can never "
                               f"complete:\n  rank 0: has returned from fn\n  rank 1: waits in {WAITS[how]}")


def starts_a_sleeper(comm, pids):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(pids, "a") as f:
        f.write(f"{sleeper.pid}\n")
    return comm.rank


@pytest.mark.real
@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_processes_a_gloo_worker_starts_end_with_the_run(tmp_path):
    pids_file = tmp_path / "pids"
    pids: list[int] = []
    try:
        assert ts.run(starts_a_sleeper, str(pids_file), world_size=2, backend="gloo", timeout=60).outputs == [0, 1]
        pids = [int(p) for p in pids_file.read_text().split()]
        assert len(pids) == 2
        deadline = time.monotonic() + 1.0
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(alive(pid) for pid in pids)
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_leftover_check_sees_an_orphan_of_a_worker():
    """A process carrying this process's pid in TPSP_SIM_RUN_OWNER counts as ours once its parent has ended."""
    env = {**os.environ, "TPSP_SIM_RUN_OWNER": str(os.getpid())}
    shell = subprocess.run(["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"], env=env, capture_output=True,
                           text=True, check=True)
    orphan = int(shell.stdout)
    try:
        assert orphan in child_processes()
    finally:
        os.kill(orphan, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while orphan in child_processes() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert orphan not in child_processes()


def isends_to_a_returned_rank_and_computes_on(comm, seconds):
    if comm.rank == 1:
        comm.isend(torch.ones(2), 0)  # rank 0 has returned; nobody waits on this
        time.sleep(seconds)  # on gloo longer than the parent's GRACE_S: still not a wait
    return comm.rank


@pytest.mark.parametrize("backend, seconds", [
    ("sim", 0.0), pytest.param("gloo", 1.5, marks=[pytest.mark.real, pytest.mark.timeout(120)])])
def test_an_isend_nobody_waits_on_is_the_unmatched_error_on_both_backends_not_a_deadlock(backend, seconds):
    with pytest.raises(ts.SimulationError) as info:
        ts.run(isends_to_a_returned_rank_and_computes_on, seconds, world_size=2, backend=backend, timeout=60)
    assert type(info.value) is ts.SimulationError
    assert str(info.value).endswith("\n  rank 1's isend to rank 0 was never received (shape (2,), torch.float32)")


def start_watchdog_and_a_group() -> tuple[subprocess.Popen, subprocess.Popen, subprocess.Popen]:
    """The run's watchdog told of one process group: a shell leading it and a sleeper the shell started."""
    watchdog = subprocess.Popen([sys.executable, "-I", "-S", str(Path(processes.__file__).with_name("watchdog.py"))],
                                stdin=subprocess.PIPE, text=True, start_new_session=True)
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    child = int(leader.stdout.readline())
    watchdog.stdin.write(f"{leader.pid}\n")
    watchdog.stdin.flush()
    return watchdog, leader, child


@pytest.mark.slow  # starts processes (0.2 s)
@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups (POSIX)")
@pytest.mark.parametrize("parent_ends", ["killed", "cleanly"])
def test_the_watchdog_kills_the_groups_only_when_the_parent_dies(parent_ends):
    watchdog, leader, child = start_watchdog_and_a_group()
    try:
        if parent_ends == "cleanly":
            watchdog.stdin.write("done\n")
        watchdog.stdin.close()  # a dead parent's end of the pipe closes the same way
        assert watchdog.wait(timeout=10) == 0
        if parent_ends == "killed":
            assert leader.wait(timeout=10) == -signal.SIGKILL
            deadline = time.monotonic() + 2.0
            while alive(child) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not alive(child)
        else:
            time.sleep(0.1)
            assert leader.poll() is None and alive(child)
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
        leader.stdout.close()


def exits_on_rank_1(comm):
    if comm.rank == 1:
        sys.exit(0)
    comm.barrier()


@pytest.mark.parametrize("backend", ["sim", pytest.param("gloo", marks=[pytest.mark.real, pytest.mark.timeout(120)])])
def test_sys_exit_in_a_rank_is_that_ranks_failure_on_both_backends(backend):
    """On gloo the worker exited with code 0, and rank 0's "Connection closed by peer" was blamed."""
    with pytest.raises(ts.RankFailedError) as info:
        ts.run(exits_on_rank_1, world_size=2, backend=backend, timeout=60)
    assert info.value.rank == 1 and str(info.value) == "rank 1 raised SystemExit (sys.exit with exit code 0)"


def returns_a_lock(comm):
    return [comm.rank, threading.Lock()]


@pytest.mark.real
@pytest.mark.timeout(120)
def test_an_output_that_cannot_travel_back_from_a_worker_is_named():
    """It was a raw traceback of the worker, blamed "before its first call"."""
    with pytest.raises(TypeError) as info:
        ts.run(returns_a_lock, world_size=2, backend="gloo", timeout=60)
    assert isinstance(info.value, ts.RankFailedError)
    assert str(info.value).startswith(f"rank {info.value.rank} raised TypeError: fn returned list holding what "
                                      f"cannot be pickled to send it back to ts.run's process (cannot pickle "
                                      f"'_thread.lock' object)")


@pytest.mark.slow  # starts processes (0.1 s)
@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups (POSIX)")
def test_a_killed_watchdog_does_not_fail_the_run_it_guarded():
    watchdog, leader, _ = start_watchdog_and_a_group()
    try:
        watchdog.kill()
        watchdog.wait()
        processes._tell(watchdog, "12345\n")  # the next worker's pid: a broken pipe, ignored
        processes._release(watchdog)
        assert leader.poll() is None  # a killed watchdog kills nothing
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
        leader.stdout.close()
