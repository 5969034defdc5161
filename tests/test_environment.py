"""environment.yml (conda) must ask for what pyproject.toml (pip) asks for, with the same lower bounds."""

import re
import sys
from pathlib import Path

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name where they differ


def _split(requirement: str) -> tuple[str, str]:
    requirement = requirement.split(";")[0].strip()
    name, bound = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", requirement).groups()
    return name.lower().replace("_", "-"), bound.replace(" ", "")


def _pyproject() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    deps = dict(_split(r) for r in requirements)
    deps["python"] = project["requires-python"]
    return {CONDA_NAMES.get(n, n): b for n, b in deps.items()}


def _conda() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    return dict(_split(d) for d in env["dependencies"] if isinstance(d, str) and d != "pip")


def test_environment_yml_lists_every_pyproject_dependency_with_the_same_bound():
    pip, conda = _pyproject(), _conda()
    assert pip == conda, (f"only in pyproject: {sorted(set(pip.items()) - set(conda.items()))}; "
                          f"only in environment.yml: {sorted(set(conda.items()) - set(pip.items()))}")


def test_environment_yml_installs_the_package_itself():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = [d for d in env["dependencies"] if isinstance(d, dict)]
    assert pip_section and "--editable ." in pip_section[0]["pip"]


def test_torch_is_a_plain_lower_bound():
    """Users keep the torch they have: the package never pins torch exactly."""
    assert _pyproject()["pytorch"].startswith(">=")
