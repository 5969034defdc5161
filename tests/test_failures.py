"""A run that goes wrong fails fast, on every rank, with a message naming who called what — never a hang."""

import _thread
import threading
import time

import pytest
import torch

import tpsp_sim as ts

pytestmark = [pytest.mark.timeout(30),  # a rank's stray Aborted or exception fails the test
              pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
              pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")]


def timed_run(fn, world_size, **kwargs):
    start = time.monotonic()
    try:
        ts.run(fn, world_size=world_size, **kwargs)
    finally:
        assert time.monotonic() - start < 5.0


def test_every_rank_receiving_first_is_a_deadlock():
    def fn(comm):
        x = torch.zeros(2)
        comm.recv(x, (comm.rank - 1) % comm.world_size)
        comm.send(x, (comm.rank + 1) % comm.world_size)

    with pytest.raises(ts.DeadlockError) as info:
        timed_run(fn, 3)
    for r in range(3):
        assert f"rank {r}: waits in recv from rank {(r - 1) % 3}" in str(info.value)


def test_blocking_sends_rendezvous_so_the_classic_ring_ordering_deadlocks():
    def fn(comm):
        x = torch.zeros(1000)
        comm.send(x, (comm.rank + 1) % comm.world_size)
        comm.recv(x, (comm.rank - 1) % comm.world_size)

    with pytest.raises(ts.DeadlockError, match=r"rank 1: waits in send to rank 2 \(shape \(1000,\)"):
        timed_run(fn, 4)


def test_a_message_that_already_arrived_is_not_a_deadlock():
    """Rank 0 posts its send and then blocks; rank 1 is slow to receive. Nobody is stuck."""
    def fn(comm):
        x = torch.arange(3.0)
        if comm.rank == 0:
            handle = comm.isend(x, 1)
            got = comm.recv(x, 1)
            handle.wait()
            return got
        time.sleep(0.2)
        got = comm.recv(x, 0)
        comm.send(x * 2, 0)
        return got

    res = ts.run(fn, world_size=2)
    assert torch.equal(res.outputs[0], torch.arange(3.0) * 2)


def test_waiting_for_a_rank_that_has_returned_is_a_deadlock():
    def fn(comm):
        if comm.rank == 1:
            comm.all_reduce(torch.ones(2))

    with pytest.raises(ts.DeadlockError, match=r"rank 0: has returned from fn"):
        timed_run(fn, 2)


@pytest.mark.parametrize("calls, shown", [
    ((lambda c: c.all_reduce(torch.ones(2)), lambda c: c.all_gather(torch.ones(2))),
     ["rank 0: all_reduce(shape=(2,), dtype=torch.float32, op='sum')", "ranks 1-2: all_gather(shape=(2,), dtype=torch.float32, dim=0)"]),
    ((lambda c: c.all_gather(torch.ones(2, 3), dim=0), lambda c: c.all_gather(torch.ones(2, 3), dim=1)),
     ["dim=0", "dim=1"]),
    ((lambda c: c.all_reduce(torch.ones(2)), lambda c: c.all_reduce(torch.ones(3))),
     ["shape=(2,)", "shape=(3,)"]),
    ((lambda c: c.all_reduce(torch.ones(2)), lambda c: c.all_reduce(torch.ones(2, dtype=torch.float64))),
     ["torch.float32", "torch.float64"]),
])
def test_collective_mismatch_says_what_each_rank_called(calls, shown):
    def fn(comm):
        calls[min(comm.rank, 1)](comm)

    with pytest.raises(ts.CollectiveMismatchError) as info:
        timed_run(fn, 3)
    for text in shown:
        assert text in str(info.value)


def test_receive_shaped_unlike_the_send_is_a_mismatch():
    def fn(comm):
        if comm.rank == 0:
            comm.send(torch.ones(4, 3), 1)
        else:
            comm.recv(torch.ones(3, 4), 0)

    with pytest.raises(ts.CollectiveMismatchError, match=r"rank 1 receives a tensor of shape \(3, 4\).*sends shape \(4, 3\)"):
        timed_run(fn, 2)


def test_an_exception_on_one_rank_releases_the_others():
    def fn(comm):
        if comm.rank == 2:
            raise KeyError("bad key on rank 2")
        comm.all_reduce(torch.ones(2))  # the others wait here for rank 2

    with pytest.raises(ts.RankFailedError) as info:
        timed_run(fn, 4)
    assert info.value.rank == 2
    assert isinstance(info.value.__cause__, KeyError)
    assert isinstance(info.value, KeyError)  # `except KeyError` still catches it
    assert "rank 2 raised KeyError" in str(info.value)


def test_a_rank_busy_computing_is_stopped_after_another_fails():
    def fn(comm):
        if comm.rank == 0:
            raise RuntimeError("rank 0 fails")
        while True:  # never communicates again
            time.sleep(0.01)

    with pytest.raises(ts.RankFailedError, match="rank 0 fails"):
        timed_run(fn, 2)


def rank_0_never_arrives(comm):
    """Rank 0 computes forever; the others wait for it at a barrier (not a deadlock: rank 0 runs)."""
    if comm.rank == 0:
        while True:
            time.sleep(0.01)
    comm.barrier()


def test_timeout_stops_a_run_that_never_ends():
    with pytest.raises(ts.SimulationError, match=r"timeout of 0.5 s"):
        timed_run(rank_0_never_arrives, 2, timeout=0.5)


def test_keyboard_interrupt_leaves_no_thread_behind():
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        timed_run(rank_0_never_arrives, 3)
    timer.join()
