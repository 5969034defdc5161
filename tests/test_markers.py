"""`make test-fast` starts no process: every test that starts one carries a marker it leaves out.

A test counts as starting a process when its own body (or a helper defined in its file that it
calls by name) uses ``subprocess``, calls a ``Popen``, or passes ``backend="gloo"`` / ``"nccl"``
(real ``torch.distributed``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
MAKEFILE = TESTS.parent / "Makefile"
LEFT_OUT = {"real", "slow", "browser"}  # by `make test-fast`


def starts_a_process_itself(fn: ast.FunctionDef) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "subprocess":
            return True
        if isinstance(node, ast.Call) and "Popen" in (getattr(node.func, "id", None), getattr(node.func, "attr", None)):
            return True
        if isinstance(node, ast.keyword) and node.arg == "backend" and getattr(node.value, "value", None) in ("gloo", "nccl"):
            return True
    return False


def marks(decorators: list[ast.expr]) -> set[str]:
    """Marker names in ``@pytest.mark.x`` / ``pytest.mark.x(...)`` decorators or a ``pytestmark`` value."""
    found = set()
    for d in decorators:
        for node in ast.walk(d):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "mark":
                found.add(node.attr)
    return found


def unmarked_process_tests(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    module_marks = set()
    functions = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
            module_marks |= marks([node.value])
        if isinstance(node, ast.FunctionDef):
            functions[node.name] = node

    def starts_a_process(fn: ast.FunctionDef, seen: set[str]) -> bool:
        if starts_a_process_itself(fn):
            return True
        called = {n.func.id for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        return any(starts_a_process(functions[c], seen | {c}) for c in called & functions.keys() - seen)

    return [f"{path.name}::{name}" for name, fn in functions.items()
            if name.startswith("test_") and not (module_marks | marks(fn.decorator_list)) & LEFT_OUT
            and starts_a_process(fn, {name})]


def test_the_guard_sees_a_process_in_a_helper_and_respects_markers(tmp_path):
    sample = tmp_path / "test_sample.py"
    sample.write_text("import pytest, subprocess\n"
                      "def launch():\n    subprocess.run(['true'])\n"
                      "def test_direct():\n    launch()\n"
                      "@pytest.mark.slow\ndef test_marked():\n    launch()\n"
                      "def test_quiet():\n    pass\n")
    assert unmarked_process_tests(sample) == ["test_sample.py::test_direct"]


@pytest.mark.parametrize("path", sorted(TESTS.glob("test_*.py")), ids=lambda p: p.name)
def test_tests_that_start_processes_are_left_out_of_test_fast(path):
    assert unmarked_process_tests(path) == []


def test_make_test_fast_leaves_those_markers_out_and_make_test_runs_everything():
    text = MAKEFILE.read_text()
    fast = re.search(r"^test-fast:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    assert '-m "not real and not slow and not browser"' in fast and "nbval" not in fast
    full = re.search(r"^test:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    assert "tests notebooks --nbval" in full and not re.search(r"-m\s+[\"']", full)  # no marker left out
