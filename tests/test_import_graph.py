"""The model-loading modules import each other in one direction only (no cycle, even through a function-level
import): ``hf.py`` -> ``quantization.py`` -> ``dtypes.py``."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_lightning"


def imports_of(path: Path) -> set[str]:
    """Every ``dpo_lightning.*`` module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpo_lightning"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("dpo_lightning"))
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt in graph and not state.get(nxt) and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if not state.get(node) and (cycle := visit(node)):
            return cycle
    return None


def test_models_package_has_no_import_cycle():
    graph = {f"dpo_lightning.models.{p.stem}": {m for m in imports_of(p) if m.startswith("dpo_lightning.models.")}
             for p in (PACKAGE / "models").glob("*.py") if p.stem != "__init__"}
    assert "dpo_lightning.models.quantization" in graph["dpo_lightning.models.hf"]  # the edge that stays
    assert find_cycle(graph) is None, find_cycle(graph)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
