"""Real runs (gloo processes) end cleanly and blame the right rank: workers die with their parent,
abandoned directories are removed, a dead or stalled rank is named with its exit code or "timeout",
and a mismatched call is reported as the simulator reports it, without waiting for gloo's timeout.

The call-log bookkeeping the parent blames with is checked first, without processes."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import tpsp_sim as ts
from tpsp_sim.dist import processes
from tpsp_sim.dist.call_log import CallBook, CallLog

# ---- the parent's bookkeeping, from call logs written by hand (no processes) ----------------------


@pytest.fixture
def logs(tmp_path: Path):
    """``logs(world_size)``: a call log per rank, written by hand, and the parent's book reading them."""
    opened: list[CallLog] = []

    def make(world_size: int) -> tuple[list[CallLog], CallBook]:
        paths = [tmp_path / f"calls{rank}" for rank in range(world_size)]
        opened.extend(CallLog(path) for path in paths)
        return opened[-world_size:], CallBook(paths)

    yield make
    for log in opened:
        log.close()


def test_same_calls_are_no_mismatch_and_are_forgotten_once_complete(tmp_path, logs):
    (a, b), book = logs(2)
    for log in (a, b):
        with log.calling("all_reduce", torch.ones(2), ("sum",), (0, 1), "mlp"):
            pass
    book.read()
    assert book.mismatch() is None
    assert book.stalled([0, 1])[0] == [0, 1]  # both returned from the only call: computing


def test_different_collectives_at_the_same_step_name_each_ranks_call_and_scope(tmp_path, logs):
    (a, b, c), book = logs(3)
    with a.calling("all_reduce", torch.ones(2), ("sum",), (0, 1, 2), "attn"):
        pass
    with b.calling("all_reduce", torch.ones(2), ("avg",), (0, 1, 2), ""):
        pass
    book.read()
    error = book.mismatch()
    assert isinstance(error, ts.CollectiveMismatchError)
    assert str(error) == ("ranks of group (0, 1, 2) made different calls at collective #0 of the group:\n"
                          "  rank 0: all_reduce(shape=(2,), dtype=torch.float32, op='sum') in scope 'attn'\n"
                          "  rank 1: all_reduce(shape=(2,), dtype=torch.float32, op='avg')\n"
                          "  rank 2: not called yet")


def test_a_receive_shaped_unlike_its_send_is_a_mismatch(tmp_path, logs):
    (a, b), book = logs(2)
    with a.calling("send", torch.ones(2, 3), (1,), (0, 1), "", pair=(0, 1)):
        pass
    with b.calling("recv", torch.ones(3, 2), (0,), (0, 1), "", pair=(0, 1)):
        pass
    book.read()
    assert str(book.mismatch()) == ("rank 1 receives a tensor of shape (3, 2) (torch.float32) from rank 0, which "
                                    "sends shape (2, 3) (torch.float32) (message #0 between them)")


def test_a_half_written_line_waits_for_its_end(tmp_path, logs):
    (a, b), book = logs(2)
    with a.calling("barrier", None, (), (0, 1), ""):
        pass
    with open(tmp_path / "calls1", "a") as f:
        f.write('{"key": ["collective", [0, 1], 0], "wh')
    book.read()
    assert book.last.keys() == {0}


def test_the_rank_others_wait_for_is_blamed_not_the_waiting_one(tmp_path, logs):
    (a, b, c), book = logs(3)
    for log in (a, b, c):
        with log.calling("all_gather", torch.ones(2), (0,), (0, 1, 2), ""):
            pass
    for log in (a, c):  # rank 1 never makes the second call
        with log.calling("all_gather", torch.ones(2), (0,), (0, 1, 2), ""):
            pass
    book.read()
    blamed, where = book.stalled([0, 1, 2])
    assert blamed == [1]
    assert where.splitlines()[1] == ("  rank 1: computing (or inside native code) after calling "
                                     "all_gather(shape=(2,), dtype=torch.float32, dim=0)")
    assert where.splitlines()[0].endswith("collective #1 of group (0, 1, 2), for rank(s) 1")


def test_ranks_that_all_wait_for_each_other_blame_nobody(tmp_path, logs):
    (a, b), book = logs(2)
    with a.calling("recv", torch.ones(2), (1,), (0, 1), "", pair=(1, 0)):
        pass
    with b.calling("recv", torch.ones(2), (0,), (0, 1), "", pair=(0, 1)):
        pass
    book.read()
    assert book.mismatch() is None
    assert book.stalled([0, 1])[0] == []


def test_unmatched_messages_are_listed_sends_first_whichever_log_is_read_first(tmp_path, logs):
    (a, b, c), book = logs(3)
    with c.calling("recv", torch.ones(3), (1,), (0, 1, 2), "", pair=(1, 2)):  # logged (and read) first
        pass
    book.read()
    with a.calling("send", torch.ones(2), (1,), (0, 1, 2), "early", pair=(0, 1)):
        pass
    book.read()
    assert [(src, dst, sending) for src, dst, sending, *_ in book.unmatched()] == [(0, 1, True), (1, 2, False)]


def test_a_dead_rank_is_named_with_its_signal_or_exit_code(tmp_path, logs):
    _, book = logs(1)
    (tmp_path / "stderr0").write_text("Segmentation fault\n")
    book.read()
    killed = processes._died(0, -signal.SIGKILL, tmp_path, book)
    assert isinstance(killed, ts.RankFailedError) and killed.rank == 0
    assert str(killed) == ("rank 0's process was killed by signal SIGKILL before its first call, without a "
                           "result; its stderr ends:\nSegmentation fault\n")
    assert "exited with code 3 before its first call" in str(processes._died(0, 3, tmp_path, book))


def test_only_directories_of_dead_runs_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with processes._work_dir() as alive:
        abandoned = tmp_path / "tpsp_sim-abandoned"
        abandoned.mkdir()
        (abandoned / "owner.lock").touch()  # nobody holds its lock
        unrelated = tmp_path / "tpsp_sim-without-lock"
        unrelated.mkdir()
        processes._remove_abandoned_work_dirs()
        assert alive.exists() and unrelated.exists() and not abandoned.exists()
    assert not alive.exists()


# ---- real processes ------------------------------------------------------------------------------

PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    import tpsp_sim as ts

    def fn(comm, pids):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # stays in the group
        with open(pids, "a") as f:
            f.write(f"{os.getpid()} {child.pid}\\n")
        time.sleep(600)

    ts.run(fn, sys.argv[1], world_size=2, backend="gloo")
""")


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.real
@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_workers_and_their_children_die_with_their_parent_and_the_next_run_removes_its_directory(
        tmp_path, monkeypatch, sig):
    """Each worker also starts a process; the parent (ts.run's process) is killed: none of the four may live."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp_path / "parent.py").write_text(PARENT)
    pids_file = tmp_path / "pids"
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), str(pids_file)],
                              env={**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"})
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while len(pids) < 4 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.1)
            pids = [int(p) for p in pids_file.read_text().split()] if pids_file.exists() else []
        assert len(pids) == 4, "the workers did not start"
        parent.send_signal(sig)
        parent.wait()
        deadline = time.monotonic() + 3
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in pids), "a worker or its child outlived the parent by 3 s"
    finally:
        parent.kill()
        parent.wait()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    [abandoned] = tmp.glob("tpsp_sim-*")  # a killed process cannot clean up after itself ...
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        res = ts.run(lambda comm: comm.all_reduce(torch.ones(1)), world_size=1, backend="gloo")
        gc.collect()
    assert [o.item() for o in res.outputs] == [1.0]
    assert not abandoned.exists() and list(tmp.iterdir()) == []  # ... the next run removes it, and its own
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []  # files closed


def dies_after_one_call(comm, stamp):
    comm.all_reduce(torch.ones(2))
    if comm.rank == 1:
        Path(stamp).write_text(str(time.time()))
        os._exit(3)
    comm.all_reduce(torch.ones(2))  # rank 0 waits here for the dead rank


@pytest.mark.real
@pytest.mark.timeout(120)
def test_a_rank_that_dies_is_blamed_with_its_exit_code_within_seconds(tmp_path):
    stamp = tmp_path / "died_at"
    with pytest.raises(ts.RankFailedError) as info:
        ts.run(dies_after_one_call, str(stamp), world_size=2, backend="gloo", timeout=60)
    assert time.time() - float(stamp.read_text()) < 2.5
    assert info.value.rank == 1
    assert str(info.value).startswith("rank 1's process exited with code 3 after calling "
                                      "all_reduce(shape=(2,), dtype=torch.float32, op='sum')")


def one_rank_spins(comm, stamp):
    comm.all_reduce(torch.ones(2))
    if comm.rank == 1:
        while True:  # a Python loop that never reaches the next collective
            pass
    Path(stamp).write_text(str(time.time()))
    comm.all_reduce(torch.ones(2))


@pytest.mark.real
@pytest.mark.timeout(120)
def test_a_rank_that_spins_is_blamed_as_stalled_when_the_timeout_passes(tmp_path):
    stamp = tmp_path / "waits_since"
    with pytest.raises(ts.SimulationError) as info:
        ts.run(one_rank_spins, str(stamp), world_size=2, backend="gloo", timeout=2)
    assert time.time() - float(stamp.read_text()) < 2 + 2
    assert not isinstance(info.value, ts.RankFailedError)
    assert str(info.value).splitlines() == [
        "timeout: the run passed its timeout of 2 s (counted from when every process had joined the group); "
        "rank 1 stalled: the other ranks wait for it:",
        "  rank 0: waiting in all_reduce(shape=(2,), dtype=torch.float32, op='sum'), collective #1 of group (0, 1), "
        "for rank(s) 1",
        "  rank 1: computing (or inside native code) after calling all_reduce(shape=(2,), dtype=torch.float32, "
        "op='sum')"]


def computes_for_a_minute(comm, stamp):
    Path(f"{stamp}{comm.rank}").write_text(str(time.time()))
    time.sleep(60)


@pytest.mark.real
@pytest.mark.timeout(120)
def test_ranks_computing_past_the_timeout_are_a_timeout_reported_at_once(tmp_path):
    stamp = tmp_path / "started_at"
    with pytest.raises(ts.SimulationError, match=r"^timeout: .* ranks 0, 1 were still computing; no rank "
                                                 r"waited in a call") as info:
        ts.run(computes_for_a_minute, str(stamp), world_size=2, backend="gloo", timeout=2)
    assert time.time() - max(float(Path(f"{stamp}{r}").read_text()) for r in range(2)) < 2 + 2
    assert "another rank failed" not in str(info.value)


def mismatched_shapes(comm, stamp):
    Path(f"{stamp}{comm.rank}").write_text(str(time.time()))
    with comm.scope("attn"):
        return comm.all_reduce(torch.ones(2 + comm.rank))


@pytest.mark.real
@pytest.mark.timeout(120)
def test_a_mismatched_collective_says_what_each_rank_called_without_waiting_for_the_timeout(tmp_path):
    stamp = tmp_path / "called_at"
    with pytest.raises(ts.CollectiveMismatchError) as info:
        ts.run(mismatched_shapes, str(stamp), world_size=2, backend="gloo", timeout=60)
    assert time.time() - max(float(Path(f"{stamp}{r}").read_text()) for r in range(2)) < 2
    assert str(info.value) == ("ranks of group (0, 1) made different calls at collective #0 of the group:\n"
                               "  rank 0: all_reduce(shape=(2,), dtype=torch.float32, op='sum') in scope 'attn'\n"
                               "  rank 1: all_reduce(shape=(3,), dtype=torch.float32, op='sum') in scope 'attn'")


def _hangs_on_rank_1(value: int) -> int:
    if sys.argv[sys.argv.index("--rank") + 1] == "1":  # the worker's own command line
        time.sleep(600)
    return value


class HangsWhenLoadedOnRank1:
    def __reduce__(self):
        return _hangs_on_rank_1, (0,)


@pytest.mark.real
@pytest.mark.timeout(120)
def test_a_rank_that_never_starts_is_named_not_the_ranks_waiting_for_it(monkeypatch):
    monkeypatch.setattr(processes, "STARTUP_S", 5.0)
    start = time.monotonic()
    with pytest.raises(ts.SimulationError, match=r"^timeout: rank\(s\) (0, )?1 had not started after 6 s "):
        ts.run(lambda comm, arg: arg, HangsWhenLoadedOnRank1(), world_size=2, backend="gloo", timeout=1)
    assert time.monotonic() - start < 6 + 2
