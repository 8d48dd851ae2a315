"""The package's layers (DESIGN, layout): every import of ours points down or sideways, never up, never round.

    ground floor  emformer.errors, .atomic, .matching, .version   import nothing of ours but each other
    data          emformer.data.*                                 + the ground floor
    models        emformer.models.*                               + data
    slurm         emformer.slurm.*                                + the ground floor only
    train         emformer.train.* (commands)                     + everything above but the entry
    entry         emformer (the package root) and emformer.__main__: may import anything, imported by nothing

Imports are read with ast from every module, at the top and inside functions alike (an import inside a
function still ties the modules together). A project import inside a function must say why in a comment
(on its line or in the block of imports it belongs to): the reason is a heavy module (lightning, deepspeed,
onnx, matplotlib), never a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folder -> package name (pyproject's package-dir).
FOLDERS = {"emformer": "emformer", "data": "emformer.data", "models": "emformer.models",
           "train": "emformer.train", "slurm": "emformer.slurm"}
ALLOWED = {
    "ground": {"ground"},
    "data": {"ground", "data"},
    "models": {"ground", "data", "models"},
    "slurm": {"ground", "slurm"},
    "train": {"ground", "data", "models", "slurm", "train"},
    "entry": {"ground", "data", "models", "slurm", "train", "entry"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def layer(module: str) -> str:
    if module in ("emformer", "emformer.__main__"):
        return "entry"
    second = module.split(".")[1]
    return second if second in ("data", "models", "train", "slurm") else "ground"


def _resolve(name: str) -> str:
    """The module an import name loads: itself, else its longest prefix that is one of ours."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _package(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]


class _Imports(ast.NodeVisitor):
    """(line, imported module, inside a function) for every import of ours in one module."""

    def __init__(self, module: str) -> None:
        self.module, self.depth, self.found = module, 0, []

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, node: ast.stmt, name: str) -> None:
        if name == "emformer" or name.startswith("emformer."):
            self.found.append((node.lineno, _resolve(name), self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: from the module's own package
            package = _package(self.module).split(".")
            base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        for alias in node.names:
            full = f"{base}.{alias.name}"
            self._add(node, full if full in MODULES else base)


def _imports(module: str) -> list[tuple[int, str, bool]]:
    visitor = _Imports(module)
    visitor.visit(ast.parse(MODULES[module].read_text(), str(MODULES[module])))
    return visitor.found


IMPORTS = {module: _imports(module) for module in MODULES}


def test_the_walk_sees_every_package_and_imports_inside_functions() -> None:
    assert {layer(m) for m in MODULES} == set(ALLOWED)
    assert (_resolve("emformer.data.inits.INITS"), _resolve("emformer.data")) == ("emformer.data.inits", "emformer.data")
    nested = [(module, target) for module, found in IMPORTS.items() for _, target, inside in found if inside]
    assert nested, "no import inside a function seen: the walk is broken"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    upward = [f"{MODULES[module].relative_to(REPO)}:{line} imports {target} ({layer(target)})"
              for line, target, _ in IMPORTS[module] if layer(target) not in ALLOWED[layer(module)]]
    assert not upward, f"{module} ({layer(module)}) may import only {sorted(ALLOWED[layer(module)])}:\n" + \
        "\n".join(upward)


def test_no_import_cycles() -> None:
    graph = {module: {target for _, target, _ in IMPORTS[module] if target != module} for module in MODULES}
    # A package's __init__ runs before its modules: importing emformer.x.y imports emformer.x too. That edge
    # is not drawn (a package root importing nothing of its own modules back is checked by the layers).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def _explained(lines: list[str], line: int) -> bool:
    """A comment on the import's line, or in the run of imports, comments and blank lines just above it."""
    if "#" in lines[line - 1]:
        return True
    for text in reversed(lines[:line - 1]):
        stripped = text.strip()
        if stripped.startswith("#"):
            return True
        if stripped and not stripped.startswith(("import ", "from ")):
            return False
    return False


def test_imports_inside_functions_say_why() -> None:
    silent = []
    for module, found in IMPORTS.items():
        lines = MODULES[module].read_text().splitlines()
        silent += [f"{MODULES[module].relative_to(REPO)}:{line} ({target})"
                   for line, target, inside in found if inside and not _explained(lines, line)]
    assert not silent, "project imports inside functions without a comment saying why (move them to the " \
        "top unless the module is heavy):\n" + "\n".join(silent)
