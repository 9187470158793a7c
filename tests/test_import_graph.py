"""The package's layers point down only, and no module imports itself back through a cycle, counting
function-level imports too (docs/architecture.md draws the layers).

Each module belongs to the layer of its longest matching prefix in ``LAYERS``; it may import modules of a lower
layer, or of its own layer inside its own subpackage (``training.module`` -> ``training.inputs``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dpo_lightning"

# top to bottom; a name is a module or a subpackage of dpo_lightning
LAYERS: list[tuple[str, ...]] = [
    ("", "train", "evaluate", "optim", "strategies"),  # the public API, entry points, forwarders
    ("cli",),  # run and eval setup for the entry points
    ("sweeps", "config"),  # sweep bookkeeping; checks of a composed config
    ("callbacks", "export"),  # Lightning callbacks; the one writer of an export
    ("training", "evaluation"),  # the LightningModule and its parts; generation and judges
    ("reference",),  # the Reference object and its modes, cache, sync, record
    ("engine",),  # log-probs, attention masks, recompute, probe
    ("data",),  # records -> tokens -> batches
    ("models", "losses"),  # model loading and quirks; the loss registry
    ("data.layouts",),  # the batch contract both data and engine speak
    ("files",),  # atomic writes
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts)
    return name.removesuffix(".__init__")


def imports_of(path: Path) -> set[str]:
    """Every ``dpo_lightning.*`` module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpo_lightning"):
            out.add(node.module)
            for alias in node.names:  # `from dpo_lightning.data import layouts` imports a module
                if (PACKAGE.parent / node.module.replace(".", "/") / f"{alias.name}.py").exists():
                    out.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("dpo_lightning"))
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the matching name) for ``dpo_lightning.x.y``."""
    rel = module.removeprefix("dpo_lightning").removeprefix(".")
    best = (-1, "")
    for i, names in enumerate(LAYERS):
        for name in names:
            if (rel == name or rel.startswith(name + ".") or name == "") and len(name) >= len(best[1]):
                if name or best[0] < 0:
                    best = (i, name)
    assert best[0] >= 0, f"{module} is in no layer of LAYERS: add it"
    return best


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


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in sorted(g.items()):
        here, name = layer_of(mod)
        for target in sorted(targets):
            there, tname = layer_of(target)
            same_room = here == there and name == tname and name != ""
            if there < here or (there == here and not same_room and name != ""):
                bad.append(f"{mod} ({name or 'top'}) imports {target} ({tname or 'top'})")
    return bad


def test_every_module_is_in_a_layer_and_imports_point_down():
    g = graph()
    assert len(g) > 60
    assert upward_imports(g) == []


def test_package_has_no_import_cycle():
    g = graph()
    # a package's __init__ re-exporting its modules is not a cycle with them: drop init -> own-submodule edges
    g = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in g.items()}
    assert find_cycle(g) is None, find_cycle(g)


def test_data_never_imports_the_engine():
    g = graph()
    assert not [(m, t) for m, ts in g.items() if m.startswith("dpo_lightning.data")
                for t in ts if t.startswith("dpo_lightning.engine")]


def test_the_checks_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert upward_imports({"dpo_lightning.data.collate": {"dpo_lightning.engine.logprobs"}}) != []
    assert upward_imports({"dpo_lightning.models.quirks": {"dpo_lightning.data.layouts"}}) == []
    assert upward_imports({"dpo_lightning.engine.logprobs": {"dpo_lightning.training.module"}}) != []
    assert upward_imports({"dpo_lightning.training.module": {"dpo_lightning.training.inputs"}}) == []
