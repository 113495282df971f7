"""The layers (README, Layout), enforced on the imports of every module, read with `ast`.

A module may import its own package and the packages of lower layers, never a higher layer or a
sibling package of its own layer; no two modules may import each other, directly or around a loop
(function-local imports count: they are dependencies too); no module loads one of ours by name
through `importlib.import_module` or `__import__`, which would hide the dependency from this test.
The `planted_*` tests show that each check fires on a tree that breaks it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The allowed direction, once: a package may import the packages of strictly lower layers.
LAYERS: dict[str, int] = {
    "lab": 0,  # the kernel: config, data, models, triggers, train/eval, metrics, artifacts
    "strategies": 1,  # libraries
    "byzantine": 1,  # update-matrix attacks (pure torch; the colluding adversary's hook)
    "inversion": 1,
    "unlearning": 1,
    "server": 2,  # the Flower apps
    "client": 2,
    "commands": 3,  # fl-lab: the only layer that imports everything
}
# Only these modules may import flwr: the Flower apps and the one thin wrapper (DESIGN.md).
FLWR_USERS = ("server", "client", "strategies.flower")
# `import_module` with a name computed at run time, allowed here only, and why.
DYNAMIC_IMPORTS = {
    "lab.torchvision_data": "resolves the numpy globals a CIFAR-10 pickle names (numpy modules only)",
}
DYNAMIC_CALLS = {"import_module", "__import__"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_tree(root: Path) -> dict[str, str]:
    """{dotted module name: source} of every module of the layered packages under `root`."""
    return {module_name(p, root): p.read_text() for pkg in LAYERS for p in sorted((root / pkg).rglob("*.py"))}


def imports(name: str, source: str, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in `source`, at any depth; `from a import b`
    names the module a.b when there is one, else a."""
    package = name if f"{name}.__init__" in known else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in known else base, node.lineno))
    return found


def dynamic_imports(source: str) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in DYNAMIC_CALLS:
                lines.append(node.lineno)
    return lines


def graph(tree: dict[str, str]) -> dict[str, dict[str, int]]:
    """{module: {our module it imports: first line}}."""
    known = set(tree) | {f"{m}.__init__" for m in tree if any(k.startswith(m + ".") for k in tree)}
    edges: dict[str, dict[str, int]] = {}
    for name, source in tree.items():
        out: dict[str, int] = {}
        for target, line in imports(name, source, known):
            if target.split(".")[0] in LAYERS and target != name:
                out.setdefault(target, line)
        edges[name] = out
    return edges


def upward(tree: dict[str, str]) -> list[str]:
    problems = []
    for name, targets in graph(tree).items():
        here = name.split(".")[0]
        for target, line in targets.items():
            there = target.split(".")[0]
            if there != here and LAYERS[there] >= LAYERS[here]:
                problems.append(f"{name}:{line} imports {target} ({there} is layer {LAYERS[there]}, "
                                f"{here} is layer {LAYERS[here]})")
    return problems


def cycles(tree: dict[str, str]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), as a sorted list."""
    edges = {m: [t for t in ts if t in tree] for m, ts in graph(tree).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(groups)


def hidden(tree: dict[str, str]) -> list[str]:
    return [f"{name}:{line} calls import_module/__import__" for name, source in tree.items()
            for line in dynamic_imports(source) if name not in DYNAMIC_IMPORTS]


def flwr_outside_the_apps(tree: dict[str, str]) -> list[str]:
    return [f"{name}:{line} imports {target}" for name, source in tree.items()
            if not name.startswith(FLWR_USERS)
            for target, line in imports(name, source, set(tree))
            if target == "flwr" or target.startswith("flwr.")]


@pytest.fixture(scope="module")
def tree() -> dict[str, str]:
    return read_tree(ROOT)


def test_the_tree_has_every_layer(tree: dict[str, str]) -> None:
    assert {m.split(".")[0] for m in tree} == set(LAYERS)
    assert "commands.cli" in tree and "lab.config" in tree


def test_no_upward_import(tree: dict[str, str]) -> None:
    assert upward(tree) == []


def test_no_import_cycle(tree: dict[str, str]) -> None:
    assert cycles(tree) == []


def test_no_hidden_import_of_our_modules(tree: dict[str, str]) -> None:
    assert hidden(tree) == []


def test_only_the_apps_and_the_wrapper_import_flwr(tree: dict[str, str]) -> None:
    assert flwr_outside_the_apps(tree) == []


def test_no_module_over_400_lines(tree: dict[str, str]) -> None:
    long = {name: n for name, source in tree.items() if (n := source.count("\n")) > 420}
    assert long == {}, "split these along their seams"


# The checks themselves, on planted trees that break them.

def test_planted_upward_import_is_caught(tree: dict[str, str]) -> None:
    planted = dict(tree)
    planted["lab.task"] += "\n\ndef _sneak():\n    from commands.cli import main\n"
    planted["strategies.robust"] += "\nimport server.app\n"
    planted["server.app"] += "\nfrom client import attacks\n"  # a sibling app, same layer
    found = upward(planted)
    assert len(found) == 3
    assert any(p.startswith("lab.task:") and "commands.cli" in p for p in found)
    assert any(p.startswith("strategies.robust:") and "server.app" in p for p in found)
    assert any(p.startswith("server.app:") and "client.attacks" in p for p in found)


def test_planted_cycle_is_caught(tree: dict[str, str]) -> None:
    planted = dict(tree)
    planted["lab.split"] += "\nfrom lab import data\n"  # data -> split -> data
    assert any({"lab.data", "lab.split"} <= set(group) for group in cycles(planted))


def test_planted_hidden_import_is_caught(tree: dict[str, str]) -> None:
    planted = dict(tree)
    planted["commands.demo"] += "\nimport importlib\nimportlib.import_module('inversion.cli')\n"
    planted["lab.metrics"] += "\nm = __import__('strategies.registry')\n"
    assert {p.split(":")[0] for p in hidden(planted)} == {"commands.demo", "lab.metrics"}


def test_relative_imports_are_resolved() -> None:
    known = {"lab.data", "lab.split", "lab.__init__", "lab"}
    assert imports("lab.data", "from .split import Split\nfrom . import split\n", known) == \
        [("lab.split", 1), ("lab.split", 2)]


def test_fl_lab_help_does_not_import_torch() -> None:
    import subprocess
    import sys

    probe = "import sys, commands.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout[:300] + res.stderr
