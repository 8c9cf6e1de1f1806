"""The package's shape: subpackages import one way (core < data, model, evaluation < nuclei < handlers, inference
< research),
no module imports another in a cycle, no file over 600 lines, no private name imported across modules.
Parsed with ``ast`` (function-level imports count too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "bundle"
#: what each subpackage may import (docs/architecture.md, "Package map")
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "model": {"core", "bundle"},  # bundle_root: where configs/model.json is
    "evaluation": {"core"},
    "nuclei": {"core", "data"},
    "handlers": {"core", "data", "model", "evaluation", "nuclei"},
    "inference": {"core", "data", "model", "nuclei"},
    "research": {"core", "data", "model", "evaluation", "nuclei", "handlers", "inference", "bundle"},
    "packaging": {"core", "data"},
    "bundle": set(),
}


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bundle":
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "bundle"]
    return found


def group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "bundle"


def test_subpackages_import_one_way():
    wrong = []
    for name, path in modules().items():
        for target, _ in imports(path):
            if group(target) != group(name) and group(target) not in ALLOWED[group(name)]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_no_import_cycle_between_modules():
    mods = modules()
    graph = {name: {t for t, _ in imports(path) if t in mods and t != name} for name, path in mods.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_no_file_over_600_lines_and_no_private_names_across_modules():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items() if len(p.read_text().splitlines()) > 600}
    assert not long, long
    private = [f"{name}: {target}.{n}" for name, path in modules().items() for target, names in imports(path)
               for n in names if n.startswith("_") and n != "__version__" and target != name]
    assert not private, private
