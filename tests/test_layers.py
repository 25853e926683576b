"""The import contract: layers point down only.

    rollouts_cli (the command, Prefect setup) -> flows -> tasks -> rollouts (stages, models)
    rollouts_cli (`serve-agent`) -> reference_agent (the simulator) -> rollouts

`rollouts` knows nothing of Prefect, Dask, tasks, flows, the command or the simulator; `tasks`
nothing of flows or the command; `flows` nothing of the command. The simulator stands beside
the collector: it may use `rollouts` (the protocol's names) but nothing of Prefect, Dask, tasks,
flows or the command, and nothing below the command uses it. Every import counts,
function-level and TYPE_CHECKING ones included, so a cycle cannot hide behind a late import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.fast

FORBIDDEN = {
    "rollouts": {"prefect", "prefect_dask", "dask", "distributed", "tasks", "flows",
                 "rollouts_cli", "reference_agent"},
    "tasks": {"flows", "rollouts_cli", "reference_agent"},
    "flows": {"rollouts_cli", "reference_agent"},
    "reference_agent": {"prefect", "prefect_dask", "dask", "distributed", "tasks", "flows",
                        "rollouts_cli"},
}  # fmt: skip


def imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(node.lineno, a.name.split(".")[0]) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(layer: str) -> None:
    modules = sorted((ROOT / layer).rglob("*.py"))
    assert modules, f"no modules in {layer}/"
    violations = [
        f"{m.relative_to(ROOT)}:{line} imports {pkg}"
        for m in modules
        for line, pkg in sorted(imported_packages(m))
        if pkg in FORBIDDEN[layer]
    ]
    assert violations == []


def test_the_contract_sees_a_violation(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from prefect import flow\n    import flows.collect\n")
    assert imported_packages(module) == {(2, "prefect"), (3, "flows")}


def test_flows_stay_short_enough_to_read_as_their_diagram() -> None:
    """The logic of a run lives in named, tested functions below flows/; a flow composes."""
    too_long = []
    for module in sorted((ROOT / "flows").glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                lines = (node.end_lineno or node.lineno) - start + 1
                if lines > 40:
                    too_long.append(f"{module.name}:{node.name} ({lines} lines)")
    assert too_long == []
