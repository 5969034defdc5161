"""Issue 24 / the unexplained "Aborted ... 'landed'": a stop (``Aborted``, raised into a rank's thread as a
class) that C code discards before it is instantiated never records itself in ``Aborted.landed``; the
runtime must stop that rank again anyway, or it spins on after its run has failed."""

import ctypes
import threading
import time

import pytest

import tpsp_sim as ts

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")]

_has_attr = ctypes.pythonapi.PyObject_HasAttr  # as pybind11's py::hasattr: any error inside is cleared
_has_attr.argtypes = (ctypes.py_object, ctypes.py_object)


class SlowAttribute:
    """An attribute whose property computes for 50 ms in Python: a stop lands inside it, in C's hasattr."""

    @property
    def value(self) -> int:
        end = time.monotonic() + 0.05
        while time.monotonic() < end:
            pass
        return 1


def test_a_stop_discarded_inside_c_is_sent_again_and_the_rank_leaves():
    """Rank 1 spends its first 0.5 s after rank 0 fails inside C's hasattr (the first stop, sent within about
    0.05 s, is discarded there), then computes in plain Python, where only a stop sent again can reach it."""
    failed_at, left = [], []

    def fn(comm, seconds):
        comm.barrier()
        if comm.rank == 0:
            time.sleep(0.05)  # rank 1 is in its first loop by now
            failed_at.append(time.monotonic())
            raise RuntimeError("rank 0 fails")
        obj, deadline = SlowAttribute(), time.monotonic() + seconds
        while not failed_at or time.monotonic() < failed_at[0] + 0.5:
            _has_attr(obj, "value")
        while time.monotonic() < deadline:  # bounded, so that a failing test leaves no thread for long
            sum(range(50))
        left.append("by itself")  # no stop reached it

    with pytest.raises(RuntimeError, match="rank 0 fails"):
        ts.run(fn, 8.0, world_size=2)
    deadline = time.monotonic() + 3.0  # the stop is sent again QUIET_RESEND = 1 s after the first
    while [t for t in threading.enumerate() if t.name.startswith("tpsp_sim")] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [t.name for t in threading.enumerate() if t.name.startswith("tpsp_sim")] == []
    assert left == []
