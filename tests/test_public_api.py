"""The public surface: every ``ts.X`` the README, the notebooks and the benchmarks use exists, ``__all__``
lists exactly what ``tpsp_sim`` exports, no public function hides a module of the same name, and the
version has one source."""

from __future__ import annotations

import importlib.metadata
import re
import types
from pathlib import Path

import nbformat

import tpsp_sim as ts

ROOT = Path(__file__).resolve().parents[1]
USE = re.compile(r"\bts\.([A-Za-z_]\w*)")


def texts() -> dict[str, str]:
    found = {"README.md": (ROOT / "README.md").read_text()}
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        found[path.name] = "\n".join(cell.source for cell in nb.cells)
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        found[path.name] = path.read_text()
    return found


def test_the_parser_finds_uses():
    assert USE.findall("x = ts.run(fn); ts.cost.estimate(t); notts.x") == ["run", "cost"]


def test_every_ts_name_the_readme_notebooks_and_benchmarks_use_exists():
    missing = sorted({f"{where}: ts.{name}" for where, text in texts().items() for name in USE.findall(text)
                      if not hasattr(ts, name)})
    assert not missing, missing


def test_all_lists_exactly_the_public_names():
    public = {name for name, value in vars(ts).items() if not name.startswith("_")
              and not (isinstance(value, types.ModuleType) and name not in ts.__all__
                       and value.__name__.startswith("tpsp_sim.") and value.__name__.count(".") == 1)}
    assert len(ts.__all__) == len(set(ts.__all__))
    assert set(ts.__all__) == public


def test_no_public_function_hides_a_module_of_the_same_name():
    """``ts.X`` a function and ``tpsp_sim.X`` (or a folder's ``X``) a module would import differently."""
    modules = {p.stem for p in (ROOT / "tpsp_sim").rglob("*.py")} | {p.name for p in (ROOT / "tpsp_sim").iterdir()
                                                                      if p.is_dir()}
    hiding = sorted(name for name in ts.__all__
                    if not isinstance(getattr(ts, name), types.ModuleType) and name in modules)
    assert not hiding, hiding


def test_version_comes_from_the_package_metadata():
    assert ts.__version__ == importlib.metadata.version("tpsp_sim")
    assert f'version = "{ts.__version__}"' in (ROOT / "pyproject.toml").read_text()
