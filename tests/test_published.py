"""benchmarks/published.py: every published number is held to its tolerance, with its source; the targets of
issue 19 (collectives within 20% of nccl-tests, memory within 5% of Megatron's formula where both count
the same tensors) are the tolerances of those rows."""

import importlib.util
import sys
from pathlib import Path

import pytest

import tpsp_sim as ts
from tpsp_sim.analysis.models import MODELS

spec = importlib.util.spec_from_file_location("published", Path(__file__).parent.parent / "benchmarks" / "published.py")
published = sys.modules["published"] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
spec.loader.exec_module(published)


@pytest.mark.parametrize("row", published.ROWS, ids=lambda r: r.what)
def test_every_row_holds_within_its_tolerance(row):
    assert row.source.startswith("https://") and row.note, row.what
    assert row.holds, f"{row.what}: published {row.published}, predicted {row.predicted} ({row.error:+.1%})"


def test_the_targets_are_the_issues():
    by_kind = {"GB/s": 0.2}
    for row in published.ROWS:
        if row.unit in by_kind:
            assert row.tolerance <= by_kind[row.unit], row.what
        if "weights + optimizer" in row.what or "GPT-shaped" in row.what:
            assert row.tolerance <= 0.05, row.what
    assert len({r.source for r in published.ROWS}) >= 6


def test_megatron_formula_by_hand():
    """Megatron's formula, written out for Llama 3 8B at t = 1 without the distributed optimizer: 18 bytes per
    parameter (its count equals the package's: 8,030,261,248, norms included); activations at s = 8192:
    (8192·4096·(18 + 4·14336/4096)·32 + 8·8192 + 8192·4096 + 4·8192·4096·(1 + 128256/4096))."""
    states, activations = published.megatron_memory(MODELS["llama3-8b"], 1, 1, 8192, distributed_optimizer=False)
    assert states == 18 * 8_030_261_248 == 18 * MODELS["llama3-8b"].parameters()
    s, h = 8192, 4096
    assert activations == s * h * 32 * 32 + 8 * s + s * h + 4 * s * (h + 128256)


def test_issue_19_case_no_longer_fits_and_agrees_with_megatron():
    """Issue 19: budget("llama3-8b", (8, 2, 1), 16384, selective, distributed optimizer) said 76.5 GiB "fits";
    Megatron's formula says over 86 GiB. Now the states agree exactly and the total is above 80 GiB."""
    b = ts.memory.budget("llama3-8b", (8, 2, 1), 16384, 1, recompute="selective")
    states, activations = published.megatron_memory(MODELS["llama3-8b"], 1, 16, 8192)
    assert b.states == pytest.approx(states, rel=1e-3)
    assert (states + activations) / 2**30 > 86 and b.total > 80 * 2**30
