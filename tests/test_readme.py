"""The README's first example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    exec(compile(blocks[0], "README.md", "exec"), {})


def test_readme_names_the_two_commands_and_ci_calls_the_test_one():
    text = README.read_text()
    assert "make lab" in text and "make test" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert ci.strip().splitlines()[-1] == "make test"


def package_table() -> dict[str, set[str]]:
    """{folder: modules} of the README's table of the package."""
    rows = re.findall(r"^\| `(\w+)/` \| ([^|]+) \|", README.read_text(), re.M)
    return {folder: set(re.findall(r"`(\w+\.py)`", modules)) for folder, modules in rows}


def test_the_package_table_lists_every_folder_and_module():
    package = README.parent / "tpsp_sim"
    folders = {p.name: {m.name for m in p.glob("*.py") if m.name != "__init__.py"}
               for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert package_table() == folders
