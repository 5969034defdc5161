"""Execute notebooks in place so their stored outputs are current: ``python tools/run_notebooks.py [NOTEBOOK ...]``.

With no arguments, runs every ``notebooks/*.ipynb``. Each notebook runs top to bottom in a fresh
kernel started in the notebook's own folder (as nbval does), with execution counts 1..n; a cell
that raises stops it and leaves the file untouched. Timing metadata is not stored, so re-running
an unchanged notebook gives the same file (images aside). Widget state is not stored (a widget
needs a live kernel; a stored snapshot only shows as "model not found" or as its text repr), and
every notebook names the kernel JupyterLab itself writes, "Python 3 (ipykernel)", so opening one
does not mark it modified. Kernels compute on one OpenMP thread (``OMP_NUM_THREADS=1``), as under
``make test`` and ``make lab`` (the root conftest.py, the Makefile): a float64 reduction's last bit
depends on how many threads split it, so one thread makes the stored outputs independent of the
machine's core count (not of its CPU: vector kernels may still round differently).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

os.environ["OMP_NUM_THREADS"] = "1"  # the kernels inherit it (see the docstring)
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
WIDGET = "application/vnd.jupyter.widget-view+json"


def strip_widgets(nb) -> None:
    """Drop stored widget state and the outputs that display a widget."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [out for out in cell.outputs if WIDGET not in out.get("data", {})]


def run_notebook(path: Path, timeout: int = 300) -> float:
    """Execute ``path`` in place; return its wall-clock run time in seconds."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False, store_widget_state=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    elapsed = time.perf_counter() - start
    strip_widgets(nb)
    nb.metadata.kernelspec = nbformat.from_dict(KERNELSPEC)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--timeout", type=int, default=300, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    total = 0.0
    for path in paths:
        elapsed = run_notebook(path.resolve(), args.timeout)
        total += elapsed
        print(f"{path}: {elapsed:.1f} s")
    print(f"{len(paths)} notebook(s) in {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
