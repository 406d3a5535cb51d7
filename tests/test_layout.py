"""The package's layout rules, read from its source: layers, cycles, size, docstrings.

The layers, each importing only those below it (NOTE: a module may import
its own layer's modules, never a higher layer's):

    _os → _arena → _codec → _loader → integrations (lightning, accelerate,
    torchdata, errors-free top level) → _tools

``errors`` sits below everything (it imports nothing of torch_arena).
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "torch_arena"
#: Layer of each top-level part of the package (lower imports nothing higher).
LAYERS = {
    "errors": 0,
    "_os": 1,
    "_arena": 2,
    "_codec": 3,
    "_loader": 4,
    "lightning": 5,
    "accelerate": 5,
    "torchdata": 5,
    "_startup": 5,
    "__init__": 6,
    "_tools": 7,
    "__main__": 8,
}
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("torch_arena", *parts)).removesuffix(".__init__")
        found[name] = path
    return found


MODULES = _modules()


def _part(module: str) -> str:
    """The top-level part of the package a module belongs to."""
    rest = module.removeprefix("torch_arena").lstrip(".")
    return rest.split(".")[0] if rest else "__init__"


def _imports(path: Path) -> set[str]:
    """torch_arena modules ``path`` imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch_arena"):
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("torch_arena"))
    return found


GRAPH = {name: _imports(path) & set(MODULES) for name, path in MODULES.items()}


def test_every_import_points_down_the_layers():
    wrong = [
        f"{module} ({_part(module)}) imports {target} ({_part(target)})"
        for module, targets in GRAPH.items()
        for target in targets
        if LAYERS[_part(target)] > LAYERS[_part(module)]
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for target in sorted(GRAPH[node]):
            if seen.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in seen:
                visit(target, [*path, target])
        seen[node] = 2

    for module in sorted(GRAPH):
        if module not in seen:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_integrations_import_no_private_name_of_one_another():
    integrations = [m for m in MODULES if _part(m) in ("lightning", "accelerate", "torchdata")]
    wrong = []
    for module, other in itertools.permutations(integrations, 2):
        for node in ast.walk(ast.parse(MODULES[module].read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == other:
                wrong += [f"{module} imports {other}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not wrong, wrong


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_says_what_it_is_for_and_fits_in_a_head(module):
    source = MODULES[module].read_text()
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring and len(docstring) > 30, f"{module} has no docstring naming its job"
    assert source.count("\n") <= MAX_LINES, f"{module}: {source.count(chr(10))} lines"


def test_public_surface_is_declared_once():
    import torch_arena
    from torch_arena import errors

    assert sorted(torch_arena.__all__) == sorted(set(torch_arena.__all__))
    for name in torch_arena.__all__:
        assert getattr(torch_arena, name) is not None, name
    # every public exception and warning lives in torch_arena.errors and is exported
    for name in errors.__all__:
        assert getattr(torch_arena, name) is getattr(errors, name), name
    classes = [getattr(torch_arena, n) for n in torch_arena.__all__]
    raised = [c for c in classes if isinstance(c, type) and issubclass(c, (Exception, Warning))]
    assert all(c.__module__ == "torch_arena.errors" for c in raised), raised
