"""Ranks take turns (tpsp_sim/sim/world.py, "Turns"): one runs at a time while turns move; a rank
that waits outside the runtime does not stall the others; a rank that computes keeps its turn."""

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


@pytest.mark.parametrize("world_size", [2, 5])
def test_a_rank_waiting_outside_the_runtime_lets_the_others_run(world_size):
    """Rank 0 waits for an Event that rank 1 sets and rank 1 for one that rank 0 sets after: whichever
    gets the first turn waits idle, so only a second runner admitted by the supervisor lets the run end."""
    first, second = threading.Event(), threading.Event()

    def fn(comm):
        if comm.rank == 0:
            assert first.wait(10)
            second.set()
        elif comm.rank == 1:
            first.set()
            assert second.wait(10)
        return comm.all_reduce(torch.ones(1)).item()

    start = time.monotonic()
    assert ts.run(fn, world_size=world_size, timeout=20).outputs == [float(world_size)] * world_size
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
