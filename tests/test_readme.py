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
