"""The package's import graph, read with `ast` (every import, also function-local and relative
ones): no cycles, no forbidden directions, a leaf config, short modules."""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path


PACKAGE = Path(__file__).parents[1] / "fedseek"
# layers below the platform (the composition root): none of them may import it
LOWER = ("clients", "aggregator", "continual", "privacy", "models", "data", "wire")
MAX_LINES = 300


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


@lru_cache(maxsize=None)
def import_graph(package: Path = PACKAGE) -> dict[str, frozenset[str]]:
    """module -> the package's modules it imports (a package's __init__ counts as a module)."""
    mods = modules(package)
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `from ..x import y` inside package a.b -> a.x
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)  # submodules
        graph[name] = frozenset(t for t in targets if t in mods and t != name)
    return graph


def cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_the_graph_sees_local_and_relative_imports_and_finds_their_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    for name, source in {"__init__.py": "", "sub/__init__.py": "", "top.py": "import os\nfrom .sub import a\n",
                         "sub/a.py": "def f():\n    from pkg.sub import b\n",  # function-local
                         "sub/b.py": "from ..top import x\n",  # relative, two levels up
                         "low.py": "from pkg.sub.a import f\n"}.items():  # imports the cycle, not in it
        (pkg / name).write_text(source)
    graph = import_graph(pkg)
    assert graph["pkg.sub.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.top"}
    assert cycles(graph) == [["pkg.sub.a", "pkg.sub.b", "pkg.top"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles between fedseek modules:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_lower_layers_never_import_the_platform_and_continual_never_imports_clients():
    bad = [f"{m} -> {t}" for m, targets in sorted(import_graph().items()) for t in sorted(targets)
           if (layer(m) in LOWER and layer(t) == "platform") or (layer(m) == "continual" and layer(t) == "clients")]
    assert not bad, "forbidden import directions:\n" + "\n".join(bad)


def test_config_is_a_leaf():
    assert not sorted(import_graph()["fedseek.config"]), "fedseek/config.py imports fedseek modules"


def test_modules_are_short():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in modules().values()
            if "migrations" not in p.parts and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_platform_is_in_wings_around_its_composition_root():
    """platform/ holds only the `flwr run` entry (the composition root) beside its five wings."""
    platform = PACKAGE / "platform"
    loose = sorted(p.name for p in platform.glob("*.py") if p.name not in ("__init__.py", "flower_app.py"))
    assert not loose, f"platform modules outside a wing (cli/ store/ mlflow/ run/ deploy/): {loose}"
    assert sorted(p.name for p in platform.iterdir() if p.is_dir() and p.name != "__pycache__") == \
        ["cli", "deploy", "mlflow", "run", "store"]
