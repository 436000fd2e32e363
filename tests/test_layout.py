"""The folders show the architecture: dependencies point down, and no module or package imports in a circle.

Every import counts, including those inside functions (they are how circles used to hide). Layers, lowest
first; a module may import its own layer or lower ones, never a higher one:

0. shared: the observation contract, errors, clock, settings;
1. ops (counters, logs, Kafka client settings, topics, health), tables (window and digest state) and alerting
   (the pure alert rules and autoscaling model);
2. storage, notify and the Faust wiring (``app/app.py``, ``app/faust_patches.py``);
3. roles: ingest, api, agents, the store migration, and the local stack;
4. entry points: the CLI, the worker's and the writer's composition roots, ``python -m app``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "agents", "tables")

LAYERS: tuple[tuple[str, ...], ...] = (
    ("app.errors", "app.retry", "app.clock", "app.models", "app.settings", "app.limits", "app.sealing"),
    ("app.ops", "tables", "app.alerting"),
    ("app.storage", "app.notify", "app.app", "app.faust_patches"),
    ("app.ingest", "app.api", "agents", "app.migration", "app.local"),
    ("app.cli", "app.worker", "app.writer", "app.__main__", "app"),
)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an imported name lives in (``app.ops.kafka.client_kwargs`` -> ``app.ops.kafka``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from app.ops import kafka`` imports app.ops.kafka; ``from app.errors import X`` app.errors
            names = [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            target = _resolve(n)
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> int:
    best, best_len = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best >= 0, f"{module} is in no layer: add its package to LAYERS"
    return best


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "app" and len(parts) > 2:
        return ".".join(parts[:2])  # app.api, app.storage, ...
    return parts[0] if parts[0] != "app" else module


def test_every_module_is_in_a_layer_and_imports_nothing_above_it() -> None:
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, targets in GRAPH.items() for t in sorted(targets) if _layer(t) > _layer(m)]
    assert upward == []


def test_no_import_circle_among_modules() -> None:
    assert _cycles(GRAPH) == []


def test_no_import_circle_among_packages() -> None:
    packages: dict[str, set[str]] = {}
    for m, targets in GRAPH.items():
        packages.setdefault(_package(m), set()).update(_package(t) for t in targets if _package(t) != _package(m))
    assert _cycles(packages) == []


def test_the_checker_sees_imports_inside_functions() -> None:
    # app/cli.py imports the web role inside a function only; a checker blind to that would pass anything.
    assert "app.api.web" in GRAPH["app.cli"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
