"""The package's import graph: no circle, and no lower layer importing a higher one.

Layers (DESIGN / STYLE §4): types → config → models / data / purifiers / losses / cache / … → the Distiller →
assembly → train / bench / cli. Imports inside functions count too: a function-local import must not hide a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "purify"

LAYERS = [
    ("types",),
    ("storage", "stopping", "config"),
    ("losses", "losses_chunked", "losses_fused", "align", "lineage", "metrics", "strategy", "gguf", "models_prepare",
     "lm", "cache", "purifiers", "data", "models", "generate", "lora", "on_policy", "readouts"),
    ("module",),
    ("assembly", "topblocks"),
    ("checkpoint", "train", "hf", "cache_writer", "audit", "bench", "cli", "__main__", "__init__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("purify") and not node.level:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("purify")]
            edges[name] |= {t for t in targets if t in modules and t != name}
    return edges


def layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    return next(i for i, names in enumerate(LAYERS) if key in names)


def test_every_module_has_a_layer():
    for module in graph():
        layer(module)  # raises StopIteration for a module nobody placed


def test_no_import_circle_in_the_package():
    edges, state, stack, circles = graph(), {}, [], []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_lower_layer_imports_a_higher_one():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
              if layer(b) > layer(a) and a != "purify"]
    assert not upward, "imports running back up: " + ", ".join(sorted(upward))


def test_types_is_a_leaf_and_config_reads_only_types_and_storage():
    edges = graph()
    assert edges["purify.types"] == set()
    assert edges["purify.config"] <= {"purify.types", "purify.storage"}
