"""Every script `make bench` runs (and the other benchmarks/) at least loads: its imports name what exists. A
renamed function once broke benchmarks/attention.py's import, and `make bench` stopped at its third script
with no test failing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_benchmark_script_loads(script, monkeypatch):
    monkeypatch.syspath_prepend(str(script.parent))  # as `python benchmarks/x.py` runs it: siblings import
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)  # runs its imports and definitions; main() only runs under __main__
    assert callable(getattr(module, "main", None)) or script.stem in ("timing", "published"), script.name


def test_every_script_make_bench_runs_exists():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    bench = makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    named = {line.split("benchmarks/")[1].split()[0] for line in bench.splitlines() if "benchmarks/" in line}
    assert named and named <= {p.name for p in SCRIPTS}, named
