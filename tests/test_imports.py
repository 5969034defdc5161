"""The package's layers: its modules import each other without cycles, and only downwards.

Every import in a module counts, also one inside a function (a lazy import hides a cycle, it does
not remove it). Importing a submodule is not counted as importing its package's ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tpsp_sim"
# Who may be imported by whom, for every folder (and top-level module) of the package: a module
# imports only from its own folder and those listed. Below the parallelisms: core/ and the backends;
# beside them models/ (the dense references they are built from); above them the compositions
# (hybrid/), then analysis/, viz/ and the exercises. No folder imports sideways.
BELOW = {
    "core": set(),
    "sim": {"core"},
    "dist": {"core"},
    "torch_api": {"core", "sim", "dist"},  # torch.distributed's backend over SimComm (sim/) or TorchComm (dist/)
    "launch": {"core", "sim", "dist", "torch_api"},
    "models": {"core"},
    "tensor_parallel": {"core", "models"},
    "context_parallel": {"core", "models"},
    "hybrid": {"core", "models", "tensor_parallel", "context_parallel"},
    "pipeline": {"core"},
    "data_parallel": {"core"},
    "analysis": {"core", "sim", "launch", "models", "tensor_parallel", "context_parallel", "hybrid",
                 "pipeline"},  # the planner and the memory budget price pipelines with ts.pipeline's closed forms
    "viz": {"core", "launch", "models", "context_parallel", "pipeline", "analysis"},
    "exercises": {"core", "launch", "models", "context_parallel", "pipeline", "data_parallel",
                  "analysis"},  # the puzzles of 04 and 07 price answers with the cost model and the planner
    "__main__": {"analysis", "context_parallel", "viz"},
    "": set(),  # tpsp_sim/__init__.py re-exports every layer's public names
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (``from .x import y`` counts y when y is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{a.name}" for a in node.names} & known
            found |= subs or ({target} & known)
    return found - {name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_parser_sees_relative_imports():
    g = graph()
    assert "tpsp_sim.core.trace" in g["tpsp_sim.core.comm"]  # from .trace import ...
    assert "tpsp_sim.core.comm" in g["tpsp_sim.sim.runtime"]  # from ..core.comm import ...
    assert "tpsp_sim.analysis.cost" in g["tpsp_sim"]  # from .analysis import cost


def cycle(g: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``g`` as a path that ends where it starts, or [] if there is none."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = "open"
        path.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = "done"
        return []

    for m in sorted(g):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_cycle_finds_a_cycle_and_only_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles():
    assert cycle(graph()) == []


def test_every_folder_of_the_package_has_its_place_in_the_layers():
    assert {layer(m) for m in modules()} == set(BELOW)


def test_layers_import_only_below_them():
    wrong = []
    for m, targets in graph().items():
        mine = layer(m)
        for t in targets:
            theirs = layer(t)
            if mine and theirs != mine and theirs not in BELOW[mine]:
                wrong.append(f"{m} imports {t}")
    assert not wrong, "\n".join(wrong)


def test_every_autograd_function_that_communicates_is_a_comm_function():
    """So none can record its backward under the wrong scope (the exercises' solutions are the learner's own).
    A plain autograd Function is allowed only where it never touches a comm (a local kernel)."""
    plain = []
    for name, path in modules().items():
        if name.startswith("tpsp_sim.exercises"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("autograd.Function") for b in node.bases):
                if "comm" in ast.unparse(node).lower():
                    plain.append(f"{name}.{node.name}")
    assert plain == ["tpsp_sim.core.autograd.CommFunction"]
