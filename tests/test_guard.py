"""The suite's own guard (tests/conftest.py): a wrong formula fails it in seconds, a hang names itself.

Each test runs pytest in a subprocess on a small test file written for it, with this suite's
conftest.py and pyproject settings and an empty Hypothesis example database, as on a fresh clone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PYPROJECT = TESTS.parent / "pyproject.toml"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

# Shaped like the suite's property tests: every example starts virtual ranks.
ALWAYS_FAILS = '''
import torch
from hypothesis import given, settings, strategies as st

import tpsp_sim as ts


@settings(max_examples=40)
@given(p=st.integers(1, 6), n=st.integers(1, 4), data=st.data())
def test_wrong_bytes(p, n, data):
    dim = data.draw(st.integers(0, 1))
    res = ts.run(lambda comm: comm.all_gather(torch.ones(n, n), dim), world_size=p)
    assert res.trace.total(rank=0, op="all_gather") == p * n * n * 4  # the planted bug: (p - 1), not p
'''

HANGS = '''
import pytest

import tpsp_sim as ts


@pytest.mark.timeout(3)
def test_spins_forever():
    def fn(comm):
        if comm.rank == 0:
            n = 0
            while n >= 0:  # computing, not waiting: no deadlock the simulator could see
                n += 1
        comm.barrier()
    ts.run(fn, world_size=3)
'''


def run_pytest(tmp_path: Path, source: str, profile: str) -> tuple[subprocess.CompletedProcess, float]:
    (tmp_path / "test_planted.py").write_text(source)
    for name in ("conftest.py", "helpers.py"):  # the suite's conftest and the helpers it imports
        shutil.copy(TESTS / name, tmp_path / name)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "HYPOTHESIS_PROFILE")}
    env["HYPOTHESIS_PROFILE"] = profile
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "test_planted.py", "-q", "-c", str(PYPROJECT),
                           "--rootdir", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=140)
    return done, time.monotonic() - start


@pytest.mark.parametrize("profile", ["dev", "ci"])
def test_a_failing_property_test_fails_fast_and_prints_its_example(tmp_path, profile):
    done, seconds = run_pytest(tmp_path, ALWAYS_FAILS, profile)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert seconds < 60, f"took {seconds:.0f} s"
    assert re.search(r"(Falsifying example|Failing test case): test_wrong_bytes\(", out), out  # its example
    assert "@reproduce_failure(" in out, out  # the blob a contributor pastes to replay it


def test_a_hung_test_is_cut_off_and_names_itself_and_every_thread(tmp_path):
    done, seconds = run_pytest(tmp_path, HANGS, "dev")
    assert done.returncode != 0
    assert seconds < 60, f"took {seconds:.0f} s"
    err = done.stderr
    assert "TIMEOUT: test_planted.py::test_spins_forever ran past its limit of 3 s" in err, err
    for thread in ("tpsp_sim-rank0", "tpsp_sim-rank1", "tpsp_sim-rank2", "MainThread"):
        assert f"stack of thread {thread} (" in err, err
    rank0 = err.split("stack of thread tpsp_sim-rank0")[1].split("--- stack of")[0]
    assert "n += 1" in rank0 or "while n >= 0" in rank0, rank0  # where it spins
