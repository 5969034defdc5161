"""No rank thread outlives its run, failures are reported promptly and name the right rank and scope,
and misuse is an error, never a silent wrong answer (issue 10). The autouse fixture in conftest.py
also fails any of these tests that leaves a thread or a child process behind."""

import os
import signal
import threading
import time

import pytest
import torch

import tpsp_sim as ts

pytestmark = [pytest.mark.timeout(60),  # a rank's stray Aborted or exception fails the test
              pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
              pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")]


def rank_threads() -> list[threading.Thread]:
    # threading.enumerate(), not is_alive(): after a signal interrupts Thread.join, is_alive() can lie
    return [t for t in threading.enumerate() if t.name.startswith("tpsp_sim")]


def wait_for_no_rank_threads(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while rank_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not rank_threads(), [t.name for t in rank_threads()]


def computes_forever(comm):
    """Rank 0 computes in Python forever; the others wait for it at a barrier."""
    if comm.rank == 0:
        while True:
            sum(range(100))
    comm.barrier()


# ---- threads that outlive a run -------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 3])
def test_a_real_sigint_stops_every_rank_thread(world_size):
    """os.kill, not _thread.interrupt_main: the signal interrupts the wait inside ts.run (on one rank,
    always the wait for the computing rank, whose Thread.is_alive() then says False on CPython 3.11)."""
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            ts.run(computes_forever, world_size=world_size)
    finally:
        timer.join()
    wait_for_no_rank_threads(2.0)


@pytest.mark.parametrize("native", ["sleep", "event"])
def test_a_rank_inside_a_long_c_call_does_not_delay_the_error_and_stops_after_it(native):
    release = threading.Event()
    reached = []

    def fn(comm):
        comm.barrier()
        if comm.rank == 0:
            time.sleep(0.1)  # rank 1 is inside its C call by now
            raise RuntimeError("rank 0 fails")
        if native == "sleep":
            time.sleep(2.0)
        else:
            release.wait()  # one C call: blocks until the test sets the event
        reached.append(comm.rank)  # the stop lands before this line
        comm.barrier()

    start = time.monotonic()
    with pytest.raises(ts.RankFailedError, match="rank 0 fails") as info:
        ts.run(fn, world_size=2)
    assert time.monotonic() - start < 1.5  # failure at 0.1 s, then POLL + GRACE; the C call lasts 2 s
    assert any("rank 1 did not stop" in note and "native code" in note for note in info.value.__notes__)
    release.set()
    wait_for_no_rank_threads(3.0)
    assert reached == []


def test_a_timeout_is_reported_on_time_while_a_rank_sleeps_in_c():
    def fn(comm):
        if comm.rank == 0:
            time.sleep(2.0)
        comm.barrier()

    start = time.monotonic()
    with pytest.raises(ts.SimulationError, match=r"timeout of 0.3 s(.|\n)*rank 0: running fn(.|\n)*rank 1: waits in barrier"):
        ts.run(fn, world_size=2, timeout=0.3)
    assert time.monotonic() - start < 1.5  # timeout at 0.3 s, then POLL + GRACE; the C call lasts 2 s
    wait_for_no_rank_threads(3.0)


def test_a_nested_run_stops_when_the_outer_run_fails():
    started = threading.Event()

    def inner(comm):
        started.set()
        computes_forever(comm)

    def outer(comm):
        if comm.rank == 0:
            ts.run(inner, world_size=3)
        started.wait(5)
        raise ValueError("outer rank 1 fails")

    start = time.monotonic()
    with pytest.raises(ts.RankFailedError, match="outer rank 1 fails"):
        ts.run(outer, world_size=2)
    assert time.monotonic() - start < 2.0
    wait_for_no_rank_threads(1.0)


def test_a_comm_kept_from_a_finished_run_raises_at_once_and_records_nothing():
    kept = []
    ts.run(lambda comm: kept.append(comm), world_size=2)
    events = len(kept[0].recorder.events)
    start = time.monotonic()
    with pytest.raises(ts.SimulationError, match="rank 0: this comm belongs to a ts.run that has already returned"):
        kept[0].all_reduce(torch.ones(2))
    with pytest.raises(ts.RankFailedError, match="already returned"):  # used inside a later run
        ts.run(lambda comm: kept[comm.rank].barrier(), world_size=2)
    assert time.monotonic() - start < 1.0
    assert len(kept[0].recorder.events) == events


def test_a_layer_kept_from_a_finished_run_raises_at_once():
    dense = torch.nn.Linear(4, 3)
    layers = ts.run(lambda comm: ts.RowParallelLinear.from_dense(dense, comm), world_size=2).outputs
    with pytest.raises(ts.SimulationError, match="rank 0: this comm belongs to a ts.run that has already returned"):
        layers[0](torch.ones(1, 2))  # its forward all-reduces


def test_every_comm_call_after_the_run_failed_raises_at_once():
    def fn(comm):
        if comm.rank == 0:
            raise KeyError("first failure")
        try:
            comm.barrier()
        except ts.SimulationError:
            pass
        comm.all_reduce(torch.ones(2))  # the run has failed: this raises too, it does not wait

    with pytest.raises(ts.RankFailedError, match="first failure"):
        ts.run(fn, world_size=3, timeout=5)


# ---- silent misuse --------------------------------------------------------------------------------

def test_devices_must_match_like_dtypes():
    def collective(comm):
        comm.all_reduce(torch.ones(2, device="meta" if comm.rank == 0 else "cpu"))

    with pytest.raises(ts.CollectiveMismatchError, match=r"rank 0: all_reduce\(.*\) on meta(.|\n)*rank 1: all_reduce\(.*\) on cpu"):
        ts.run(collective, world_size=2)

    def message(comm):
        if comm.rank == 0:
            comm.send(torch.ones(2, device="meta"), 1)
        else:
            comm.recv(torch.ones(2), 0)

    with pytest.raises(ts.CollectiveMismatchError, match=r"rank 1 receives .* on cpu from rank 0, .* on meta"):
        ts.run(message, world_size=2)


def test_avg_and_sum_on_different_ranks_are_a_mismatch_and_avg_is_the_rank_order_sum_over_p():
    xs = [torch.tensor([1.0, 2.0]), torch.tensor([4.0, 8.0]), torch.tensor([16.0, 32.0])]

    def fn(comm, ops):
        return comm._collective("all_reduce", xs[comm.rank], ops[comm.rank])  # the backend primitive, unchecked

    res = ts.run(fn, ["avg"] * 3, world_size=3)
    for out in res.outputs:
        assert torch.equal(out, torch.tensor([7.0, 14.0]))  # (1 + 4 + 16) / 3, (2 + 8 + 32) / 3
    with pytest.raises(ts.CollectiveMismatchError, match=r"rank 0: all_reduce\(.*op='avg'\)(.|\n)*ranks 1-2: all_reduce\(.*op='sum'\)"):
        ts.run(fn, ["avg", "sum", "sum"], world_size=3)


@pytest.mark.parametrize("code", [3, None, "bye"])
def test_sys_exit_in_a_rank_is_a_failure_not_an_exit(code):
    with pytest.raises(ts.RankFailedError) as info:
        ts.run(lambda comm: exit(code) if comm.rank == 1 else None, world_size=2)
    # an uncaught SystemExit(None) would end the script with status 0; a RankFailedError ends it with 1
    assert not isinstance(info.value, (SystemExit, KeyboardInterrupt))
    assert isinstance(info.value.__cause__, SystemExit)
    assert f"rank 1 raised SystemExit (sys.exit with exit code {code!r})" in str(info.value)


class NeedsTwoArguments(Exception):
    def __init__(self, what, where):
        super().__init__(f"{what} at {where}")
        self.what = what


@pytest.mark.parametrize("raise_it, message", [
    (lambda: b"\xff".decode("utf-8"), "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0"),
    (lambda: (_ for _ in ()).throw(NeedsTwoArguments("bad", "step 3")), "NeedsTwoArguments: bad at step 3"),
])
def test_exceptions_whose_constructor_needs_arguments_keep_their_message(raise_it, message):
    with pytest.raises(ts.RankFailedError) as info:
        ts.run(lambda comm: raise_it(), world_size=2)
    assert message in str(info.value)
    assert isinstance(info.value, type(info.value.__cause__))  # `except UnicodeDecodeError` still catches it


def test_a_deadlock_on_1000_ranks_has_a_short_message():
    def fn(comm):
        if comm.rank > 0:
            comm.all_reduce(torch.ones(4))

    with pytest.raises(ts.DeadlockError) as info:
        ts.run(fn, world_size=1000)
    text = str(info.value)
    assert len(text) < 1000, len(text)
    assert "rank 0: has returned from fn" in text
    assert ("ranks 1-999: waits in all_reduce(shape=(4,), dtype=torch.float32, op='sum'), collective #0 of "
            "group (0-999), for group ranks [0] that have not called it") in text


def test_a_deadlock_with_many_different_waits_shows_twelve_lines():
    """40 ranks each receiving from its left neighbour first: 40 different waits, 11 shown, the rest counted."""
    def fn(comm):
        comm.recv(torch.ones(1), (comm.rank - 1) % comm.world_size)

    with pytest.raises(ts.DeadlockError) as info:
        ts.run(fn, world_size=40)
    lines = str(info.value).splitlines()
    assert len(lines) == 1 + 12
    assert lines[1].startswith("  rank 0: waits in recv from rank 39 ")
    assert lines[11].startswith("  rank 10: waits in recv from rank 9 ")
    assert lines[12] == "  ... and 29 more ranks (11-39), 29 different states"


def test_errors_name_the_scope_each_rank_is_in():
    def mismatch(comm):
        with comm.scope("block0"), comm.scope("attn" if comm.rank == 0 else "mlp"):
            comm.all_reduce(torch.ones(2 + comm.rank))

    with pytest.raises(ts.CollectiveMismatchError,
                       match=r"rank 0: all_reduce\(shape=\(2,\).* in scope 'block0/attn'\n  rank 1: .* in scope 'block0/mlp'"):
        ts.run(mismatch, world_size=2)

    def deadlock(comm):
        with comm.scope("ring"):
            comm.recv(torch.ones(2), (comm.rank + 1) % 2)

    with pytest.raises(ts.DeadlockError, match=r"rank 0: waits in recv from rank 1 .* in scope 'ring'"):
        ts.run(deadlock, world_size=2)


@pytest.mark.parametrize("timeout", ["5", 0, -1.0, True, float("nan"), float("inf")])
def test_a_bad_timeout_is_a_value_error_naming_it(timeout):
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds or None, got"):
        ts.run(lambda comm: None, world_size=2, timeout=timeout)
