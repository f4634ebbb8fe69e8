"""The house's one rule per layer, checked from the code (every import statement, lazy ones included).

* the library (``shared/selma``, without its ``app`` layer) imports no service, no app and no testbed;
* a service (``services/<name>/selma_<name>``) imports no other service, no testbed and not the app;
* no package imports a testbed except the testbed itself (testbeds are plugins: selma.plugins loads them);
* the packages' import graph has no cycle.

Packages are found on disk (the folder is the import name), not from a hand list.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIBRARY, APP = "selma", "selma.app"


def packages() -> dict[str, tuple[str, Path]]:
    """import name → (layer, folder) for the library, the app, every service and every testbed."""
    out: dict[str, tuple[str, Path]] = {LIBRARY: ("library", REPO / "shared" / "selma"), APP: ("app", REPO / "shared" / "selma" / "app")}
    for layer, root in (("service", "services"), ("testbed", "testbeds")):
        for folder in sorted((REPO / root).glob("*/selma_*")):
            if (folder / "__init__.py").is_file():
                assert folder.name == f"selma_{folder.parent.name}", f"{folder}: the folder must be named selma_<its parent>"
                out[folder.name] = (layer, folder)
    return out


PACKAGES = packages()


def owner(module: str) -> str | None:
    """The package an imported module belongs to (None: outside selma)."""
    if module == APP or module.startswith(APP + "."):
        return APP
    top = module.split(".")[0]
    return top if top in PACKAGES else None


def source_package(path: Path) -> str:
    if path.is_relative_to(PACKAGES[APP][1]):
        return APP
    for name, (_layer, folder) in PACKAGES.items():
        if name not in (LIBRARY, APP) and path.is_relative_to(folder):
            return name
    return LIBRARY


def imports() -> list[tuple[str, str, str]]:
    """(importing package, imported package, "file:line") for every import of a selma package."""
    found = []
    roots = {folder for _layer, folder in PACKAGES.values()}
    for root in roots:
        for path in root.rglob("*.py"):
            if "v1" in path.relative_to(REPO).parts[:3]:  # generated stubs
                continue
            src = source_package(path)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                else:
                    continue
                for name in names:
                    dst = owner(name)
                    if dst is not None and dst != src:
                        found.append((src, dst, f"{path.relative_to(REPO)}:{node.lineno}"))
    return sorted(set(found))


EDGES = imports()


def layer(pkg: str) -> str:
    return PACKAGES[pkg][0]


def test_the_tree_has_the_layers_the_rules_speak_of():
    layers = {layer(p) for p in PACKAGES}
    assert layers == {"library", "app", "service", "testbed"}
    assert {p for p in PACKAGES if layer(p) == "service"} >= {"selma_prompts", "selma_render", "selma_training", "selma_serving", "selma_evaluation"}
    assert any(layer(dst) == "service" for src, dst, _ in EDGES if src == APP), "the checker sees the app's imports"


def test_the_library_imports_no_service_app_or_testbed():
    bad = [f"{where}: {src} imports {dst}" for src, dst, where in EDGES if src == LIBRARY and dst != LIBRARY]
    assert not bad, "\n".join(bad)


def test_no_service_imports_another_service_a_testbed_or_the_app():
    bad = [f"{where}: {src} imports {dst}" for src, dst, where in EDGES if layer(src) == "service" and dst != LIBRARY]
    assert not bad, "\n".join(bad)


def test_only_a_testbed_imports_itself():
    bad = [f"{where}: {src} imports {dst}" for src, dst, where in EDGES if layer(dst) == "testbed"]
    assert not bad, "\n".join(bad)


def test_the_package_graph_has_no_cycle():
    graph: dict[str, set[str]] = defaultdict(set)
    for src, dst, _ in EDGES:
        graph[src].add(dst)
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(PACKAGES):
        if node not in state and (cycle := visit(node)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))
