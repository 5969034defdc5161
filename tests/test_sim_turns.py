"""Ranks take turns (tpsp_sim/sim/world.py, "Turns"): no more run at once than hold a turn; ranks that
wait outside the runtime do not stall the others; a rank that computes keeps its turn."""

import threading
import time

import pytest
import torch

import tpsp_sim as ts

pytestmark = pytest.mark.timeout(60)


def test_no_more_ranks_run_between_communication_calls_than_hold_a_turn():
    """Torch ops release the GIL, so free-running rank threads would overlap inside the loop below."""
    lock = threading.Lock()
    inside, excess = [0], []

    def fn(comm):
        x = torch.randn(32, 32, dtype=torch.float64)
        for _ in range(5):
            with lock:
                inside[0] += 1
            for _ in range(20):
                x = torch.tanh(x @ x)
            with lock:
                excess.append(inside[0] - comm.world.runners)  # > 0: more ranks inside than hold a turn
                inside[0] -= 1
            x = comm.all_reduce(x, "avg")
        return x

    ts.run(fn, world_size=4)
    assert len(excess) == 20 and max(excess) <= 0, excess


@pytest.mark.parametrize("world_size", [3, 6])
def test_ranks_waiting_outside_the_runtime_let_the_others_run(world_size):
    """A chain of Events: rank r waits for rank r+1, the last rank waits for nobody. The first ranks to
    get a turn wait idle, so only the runners the supervisor admits one by one let the run end."""
    events = [threading.Event() for _ in range(world_size - 1)]

    def fn(comm):
        r = comm.rank
        if r < world_size - 1:
            assert events[r].wait(10)
        if r > 0:
            events[r - 1].set()
        return comm.all_reduce(torch.ones(1)).item()

    start = time.monotonic()
    assert ts.run(fn, world_size=world_size, timeout=20).outputs == [float(world_size)] * world_size
    assert time.monotonic() - start < 5


def test_one_idle_runner_is_enough_to_admit_another_while_the_other_computes():
    """Rank 0 computes until rank 2 sets the Event that rank 1 waits for: rank 1 holds a turn idle, so
    the supervisor must admit rank 2 although rank 0 keeps using CPU."""
    event = threading.Event()

    def fn(comm):
        if comm.rank == 0:
            deadline = time.monotonic() + 10
            while not event.is_set() and time.monotonic() < deadline:
                sum(range(100))
        elif comm.rank == 1:
            assert event.wait(10)
        else:
            event.set()

    start = time.monotonic()
    ts.run(fn, world_size=3, timeout=20)
    assert time.monotonic() - start < 5


def test_a_computing_rank_keeps_its_turn_and_the_timeout_names_the_ranks_waiting_for_one():
    """A rank computing in Python uses CPU, so no second runner is admitted: the others never get a
    first turn, and the timeout says so (it does not claim that they run fn)."""
    def fn(comm):
        while True:
            sum(range(100))

    with pytest.raises(ts.SimulationError, match="timeout") as info:
        ts.run(fn, world_size=8, timeout=1.0)
    message = str(info.value)
    assert "is ready, waiting for its turn to run" in message, message
    assert "running fn" in message, message


def test_ranks_compute_with_one_intra_op_thread_and_the_setting_comes_back():
    """The ranks are the parallelism; torch's own thread count is restored after every run, failed or
    nested (the nested run must not restore it while the outer one still runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        def nested(comm):
            inner = ts.run(lambda c: torch.get_num_threads(), world_size=2).outputs
            return inner, torch.get_num_threads()

        assert ts.run(nested, world_size=2).outputs == [([1, 1], 1)] * 2
        assert torch.get_num_threads() == 3

        def fails(comm):
            raise RuntimeError("boom")

        with pytest.raises(ts.RankFailedError):
            ts.run(fails, world_size=2)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
