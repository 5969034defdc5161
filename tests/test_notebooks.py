"""Every notebook in notebooks/ is stored as a clean top-to-bottom run (nbval then re-runs it).

Checked per notebook: a valid nbformat file named ``NN_name.ipynb`` (or ``NNb_name.ipynb``, the second
part of a notebook split in two: 03b follows 03); every code cell executed, with
execution counts 1..n in order (a stale or out-of-order run fails); no error outputs; every output
small; ``nbval-ignore-output`` exactly on the cells that display a widget or carry a
``# nondeterministic: <why>`` comment, and no other nbval escape hatch; a seed set; a markdown link
to the next notebook; no stored widget state (it needs a live kernel); the kernel named "Python 3
(ipykernel)", as JupyterLab writes it. Figures are compared with a fresh run by nbval itself,
extended in notebooks/conftest.py (tested at the end of this file). The ``bad_*`` tests show each check failing on a broken notebook.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
LAST = 11  # the suite ends with 11_pytorch_native.ipynb (issue 23): the one notebook with no next

NAME = re.compile(r"^(\d\d)([b-z]?)_[a-z0-9_]+\.ipynb$")  # 03b_*: the second part of 03, between 03 and 04
IGNORE_TAG = "nbval-ignore-output"
WIDGET = "application/vnd.jupyter.widget-view+json"
NONDETERMINISTIC = re.compile(r"^\s*# nondeterministic: \S.{4,}", re.MULTILINE)  # a reason, not just the marker
ESCAPES = re.compile(r"NBVAL_|\b(nbval-skip|nbval-raises-exception|raises-exception|nbval-check-output)\b")
SEED = re.compile(r"\b(manual_seed|random\.seed|default_rng)\(")
LINK = re.compile(r"\]\(([^)\s]+\.ipynb)(#[^)\s]*)?\)")
KERNEL_NAME = "Python 3 (ipykernel)"  # what JupyterLab writes: any other name marks the notebook modified on open
MAX_OUTPUT = 150_000  # bytes of one stored output (a dpi-80 figure is ~30 kB)
MAX_NOTEBOOK = 2_000_000  # bytes of the whole file


def check_executed(nb) -> list[str]:
    """Every code cell ran, once, top to bottom in one kernel: counts 1..n, results numbered alike."""
    problems, expected = [], 1
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if not cell.source.strip():
            problems.append(f"cell {i}: empty code cell")
        elif cell.execution_count is None:
            problems.append(f"cell {i}: not executed")
        elif cell.execution_count != expected:
            problems.append(f"cell {i}: execution count {cell.execution_count}, expected {expected} (stale run?)")
        expected = (cell.execution_count or expected - 1) + 1
        for out in cell.outputs:
            if out.output_type == "execute_result" and out.execution_count != cell.execution_count:
                problems.append(f"cell {i}: result numbered {out.execution_count}, cell {cell.execution_count}")
    return problems


def check_no_errors(nb) -> list[str]:
    return [f"cell {i}: stored error {out.get('ename')}: {out.get('evalue')}"
            for i, cell in enumerate(nb.cells) for out in cell.get("outputs", []) if out.output_type == "error"]


def check_small(nb, path: Path | None = None) -> list[str]:
    problems = [f"cell {i}: an output of {size:,} bytes (limit {MAX_OUTPUT:,})"
                for i, cell in enumerate(nb.cells) for out in cell.get("outputs", [])
                if (size := len(json.dumps(out))) > MAX_OUTPUT]
    size = path.stat().st_size if path else len(nbformat.writes(nb))
    if size > MAX_NOTEBOOK:
        problems.append(f"the notebook is {size:,} bytes (limit {MAX_NOTEBOOK:,})")
    return problems


def check_tags(nb) -> list[str]:
    """nbval-ignore-output exactly where a widget is shown or a comment says why the output varies."""
    problems = []
    for i, cell in enumerate(nb.cells):
        tags = cell.metadata.get("tags", [])
        if ESCAPES.search(cell.source) or any(ESCAPES.search(t) for t in tags):
            problems.append(f"cell {i}: nbval escape hatch (only the {IGNORE_TAG} tag is allowed)")
        if cell.cell_type != "code":
            continue
        widget = any(WIDGET in out.get("data", {}) for out in cell.outputs)
        justified = widget or bool(NONDETERMINISTIC.search(cell.source))
        if (IGNORE_TAG in tags) != justified:
            problems.append(f"cell {i}: " + (f"{IGNORE_TAG} without a widget output or a '# nondeterministic: <why>' "
                                             f"comment" if IGNORE_TAG in tags else
                                             f"shows a widget or says it is nondeterministic, but lacks {IGNORE_TAG}"))
    return problems


def check_no_widget_state(nb) -> list[str]:
    problems = ["widget state stored in the notebook's metadata"] if "widgets" in nb.metadata else []
    return problems + [f"cell {i}: a stored widget output (it shows as text, or 'model not found', without a kernel)"
                       for i, cell in enumerate(nb.cells) for out in cell.get("outputs", [])
                       if WIDGET in out.get("data", {})]


def check_kernel(nb) -> list[str]:
    spec = nb.metadata.get("kernelspec", {})
    if (spec.get("name"), spec.get("display_name")) != ("python3", KERNEL_NAME):
        return [f"kernelspec {dict(spec)}: expected name 'python3', display_name {KERNEL_NAME!r}"]
    return []


def check_seeded(nb) -> list[str]:
    return [] if any(SEED.search(c.source) for c in nb.cells if c.cell_type == "code") else ["no seed is set (manual_seed, random.seed)"]


def next_prefix(name: str, existing: list[str]) -> str | None:
    """The name prefix of the notebook after ``name``: its next part if one exists (03 -> 03b_, 03b -> 03c_),
    else the notebook numbered one more (03b -> 04_); None after the last."""
    number, part = NAME.match(name).groups()
    following = f"{number}{chr(ord(part or 'a') + 1)}_"
    if any(e.startswith(following) for e in existing):
        return following
    return None if int(number) == LAST else f"{int(number) + 1:02d}_"


def check_links_next(nb, name: str, existing: list[str]) -> list[str]:
    """A markdown link to the next notebook (``next_prefix``; that exact file, once it exists)."""
    prefix = next_prefix(name, existing)
    if prefix is None:
        return []
    targets = {Path(m.group(1)).name for c in nb.cells if c.cell_type == "markdown" for m in LINK.finditer(c.source)}
    nexts = [t for t in targets if t.startswith(prefix)]
    present = [e for e in existing if e.startswith(prefix)]
    if not nexts:
        return [f"no markdown link to the next notebook ({prefix}*.ipynb)"]
    if present and present[0] not in nexts:
        return [f"links {sorted(nexts)}, but the next notebook is {present[0]}"]
    return []


def all_problems(nb, name: str, existing: list[str], path: Path | None = None) -> list[str]:
    problems = [] if NAME.match(name) else [f"name {name!r} is not NN_lowercase_name.ipynb"]
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as error:
        problems.append(f"invalid nbformat: {error.message}")
    problems += check_executed(nb) + check_no_errors(nb) + check_small(nb, path) + check_tags(nb) + check_seeded(nb)
    problems += check_no_widget_state(nb) + check_kernel(nb)
    if NAME.match(name):
        problems += check_links_next(nb, name, existing)
    return problems


# ---- the notebooks ------------------------------------------------------------------------------

def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_a_clean_run(path):
    nb = nbformat.read(path, as_version=4)
    problems = all_problems(nb, path.name, [p.name for p in NOTEBOOKS], path)
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


# ---- each check fails on a notebook that breaks it ------------------------------------------------

def executed(*sources: str, **tags: list[str]) -> nbformat.NotebookNode:
    """A notebook as a clean run would store it: seeded, linked to 01, counts 1..n, one output each."""
    nb = new_notebook(cells=[new_markdown_cell("Next: [01](01_tensor_parallel.ipynb)")],
                      metadata={"kernelspec": {"name": "python3", "display_name": KERNEL_NAME, "language": "python"}})
    for n, source in enumerate(("import torch\ntorch.manual_seed(0)",) + sources, start=1):
        cell = new_code_cell(source, execution_count=n,
                             outputs=[new_output("stream", name="stdout", text=f"{n}\n")])
        cell.metadata["tags"] = tags.get(f"cell{n}", [])
        nb.cells.append(cell)
    return nb


def test_a_clean_run_passes():
    assert all_problems(executed("print(2)", "print(3)"), "00_intro.ipynb", ["00_intro.ipynb"]) == []


def test_bad_unexecuted_or_out_of_order_cells():
    nb = executed("print(2)", "print(3)")
    nb.cells[2].execution_count = None
    assert "cell 2: not executed" in check_executed(nb)
    nb = executed("print(2)", "print(3)")
    nb.cells[2].execution_count, nb.cells[3].execution_count = 3, 2
    assert len(check_executed(nb)) == 2
    nb = executed("print(2)")
    nb.cells[2].execution_count = 7  # a cell re-run after the others
    assert check_executed(nb) == ["cell 2: execution count 7, expected 2 (stale run?)"]
    nb = executed("print(2)")
    nb.cells[2].outputs = [new_output("execute_result", data={"text/plain": "2"}, execution_count=5)]
    assert check_executed(nb) == ["cell 2: result numbered 5, cell 2"]
    nb = executed("")
    assert check_executed(nb) == ["cell 2: empty code cell"]


def test_bad_stored_error():
    nb = executed("1 / 0")
    nb.cells[2].outputs = [new_output("error", ename="ZeroDivisionError", evalue="division by zero", traceback=[])]
    assert check_no_errors(nb) == ["cell 2: stored error ZeroDivisionError: division by zero"]


def test_bad_big_output():
    nb = executed("plot()")
    nb.cells[2].outputs = [new_output("display_data", data={"image/png": "A" * (MAX_OUTPUT + 1)})]
    assert len(check_small(nb)) == 1
    nb.cells[2].outputs = [new_output("display_data", data={"image/png": "A" * (MAX_OUTPUT // 2)})] * 30
    assert check_small(nb) == [f"the notebook is {len(nbformat.writes(nb)):,} bytes (limit {MAX_NOTEBOOK:,})"]


def test_bad_ignore_output_tags():
    assert check_tags(executed("print(time.time())", cell2=[IGNORE_TAG])) != []  # no reason given
    reason = "# nondeterministic: wall-clock timing\nprint(time.time())"
    assert check_tags(executed(reason, cell2=[IGNORE_TAG])) == []
    assert check_tags(executed(reason)) != []  # says it varies, but nbval would compare it
    assert check_tags(executed("# nondeterministic: \nprint(1)", cell2=[IGNORE_TAG])) != []  # empty reason
    nb = executed("slider")
    nb.cells[2].outputs = [new_output("display_data", data={WIDGET: {"model_id": "x"}, "text/plain": "IntSlider()"})]
    assert check_tags(nb) != []
    nb.cells[2].metadata["tags"] = [IGNORE_TAG]
    assert check_tags(nb) == []
    assert check_tags(executed("# NBVAL_IGNORE_OUTPUT\nprint(2)")) != []
    assert check_tags(executed("print(2)", cell2=["nbval-skip"])) != []


def test_bad_no_seed():
    nb = executed("print(2)")
    nb.cells[1].source = "import torch"
    assert check_seeded(nb) == ["no seed is set (manual_seed, random.seed)"]


def test_bad_links():
    nb = executed("print(2)")
    assert check_links_next(nb, "00_intro.ipynb", ["00_intro.ipynb"]) == []  # 01 not written yet
    assert check_links_next(nb, "00_intro.ipynb", ["00_intro.ipynb", "01_tensor_parallel.ipynb"]) == []
    assert check_links_next(nb, "00_intro.ipynb", ["00_intro.ipynb", "01_tp.ipynb"]) != []  # wrong file name
    assert check_links_next(nb, "01_tensor_parallel.ipynb", []) != []  # must link 02_*
    nb.cells[0].source = "Next: 01_tensor_parallel.ipynb (not a link)"
    assert check_links_next(nb, "00_intro.ipynb", []) != []
    assert check_links_next(nb, f"{LAST:02d}_last.ipynb", []) == []
    assert all_problems(executed(), "intro.ipynb", []) == ["name 'intro.ipynb' is not NN_lowercase_name.ipynb"]


def test_bad_links_around_a_notebook_split_in_two():
    nb = executed("print(2)")  # links 01_tensor_parallel.ipynb only
    split = ["00_intro.ipynb", "00b_more.ipynb", "01_tensor_parallel.ipynb"]
    assert check_links_next(nb, "00_intro.ipynb", split) == [  # skips its second part
        "no markdown link to the next notebook (00b_*.ipynb)"]
    assert check_links_next(nb, "00b_more.ipynb", split) == []  # the second part leads on to 01
    assert check_links_next(nb, "00b_more.ipynb", ["00b_more.ipynb", "01_tp.ipynb"]) != []
    nb.cells[0].source = "Next: [part b](00b_more.ipynb)"
    assert check_links_next(nb, "00_intro.ipynb", split) == []
    assert check_links_next(nb, "00b_more.ipynb", split) == ["no markdown link to the next notebook (01_*.ipynb)"]
    assert all_problems(executed(), "00B_x.ipynb", []) == ["name '00B_x.ipynb' is not NN_lowercase_name.ipynb"]


def test_bad_widget_state_or_kernel_name():
    nb = executed("slider")
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.cells[2].outputs = [new_output("display_data", data={WIDGET: {"model_id": "x"}, "text/plain": "VBox()"})]
    assert check_no_widget_state(nb) == ["widget state stored in the notebook's metadata",
                                         "cell 2: a stored widget output (it shows as text, or 'model not found', "
                                         "without a kernel)"]
    nb.metadata["kernelspec"]["display_name"] = "Python 3"
    assert check_kernel(nb) == ["kernelspec {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}: "
                                "expected name 'python3', display_name 'Python 3 (ipykernel)'"]


# ---- stored figures are compared with a fresh run (notebooks/conftest.py extends nbval) ------------

def _figure_plugin():
    import importlib.util

    spec = importlib.util.spec_from_file_location("notebook_figures", NOTEBOOK_DIR / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png_output(heights, size=(4, 3)) -> dict:
    import base64
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    fig.subplots().bar(["a", "b", "c"], heights)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return {"output_type": "display_data", "data": {"image/png": base64.b64encode(buffer.getvalue()).decode()}}


def test_a_fresh_figure_equal_to_the_stored_one_passes():
    plugin = _figure_plugin()
    assert plugin.figure_problems([_png_output([1, 2, 3])], [_png_output([1, 2, 3])]) == []


def test_bad_stale_figures():
    plugin = _figure_plugin()
    fresh = [_png_output([1, 2, 3])]
    stale = plugin.figure_problems(fresh, [_png_output([1, 2.5, 3])])          # one bar moved
    assert len(stale) == 1 and stale[0].startswith("figure 0: ") and "stale" in stale[0]
    assert plugin.figure_problems(fresh, [_png_output([1, 2, 3], size=(5, 3))]) == [
        "figure 0: 320x240 px fresh, 400x240 px stored"]
    assert plugin.figure_problems(fresh, []) == [
        "the fresh run draws 1 figure(s), the notebook stores 0: re-run it (python tools/run_notebooks.py)"]


def test_the_sanitizer_masks_round_off_and_nothing_bigger():
    """nbval_sanitize.cfg's round-off rule: an error of 0 or below 1e-12 (its digits depend on the CPU) is masked;
    an error of 1e-12 or more, an ordinary number, a size or a time is compared as printed."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(NOTEBOOK_DIR / "nbval_sanitize.cfg")
    rule = cfg["round-off"]
    masked = lambda text: re.sub(rule["regex"], rule["replace"], text)  # noqa: E731
    assert masked("max error 4.4e-16, 0.0e+00; 7.1e-15") == "max error ROUNDOFF, ROUNDOFF; ROUNDOFF"
    for kept in ("max error 1.0e-12", "max error 2.0e-03", "1.0e+00", "3.6 ms", "10.0e-16 B"):
        assert masked(kept) == kept, kept
