"""The package's import graph: no cycle among module-level imports, no import from a lower layer up.

Every module of ``stackcat`` is parsed with :mod:`ast` (nothing is imported);
an edge ``a -> b`` is an ``import`` of stackcat module ``b`` anywhere in ``a``
(module level, inside a function, or under ``if TYPE_CHECKING``). Layers are
read from dotted-name prefixes, the longest prefix winning, so a module that
moves into a package (``stackcat/features/...``) is placed by where it lives.
docs/architecture.md draws the same layers.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "stackcat"

# Lowest first. A module may import its own layer and the layers below it.
LAYERS: dict[str, tuple[str, ...]] = {
    # helpers everything may use: probability matrices, progress, atomic files and digests,
    # run-folder files, labels
    "ground floor": ("stackcat", "stackcat.core", "stackcat.topk", "stackcat.progress", "stackcat.files",
                     "stackcat.runs", "stackcat.models._base"),
    # tables in, frozen features out
    "data and features": ("stackcat.data", "stackcat.columns", "stackcat.corrections", "stackcat.demo",
                          "stackcat.features"),
    "models": ("stackcat.models",),
    "meta": ("stackcat.meta", "stackcat.taxonomy", "stackcat.metrics"),
    "stacking": ("stackcat.stacking", "stackcat.preflight"),
    "report and presets": ("stackcat.report", "stackcat.review", "stackcat.presets", "stackcat.label_issues",
                           "stackcat.lookalikes"),
    # a fitted stack ready for production: the predictor, the model bundle, the service
    "serving": ("stackcat.predictor", "stackcat.bundle", "stackcat.batch", "stackcat.serve"),
    "cli": ("stackcat.cli", "stackcat.__main__"),
}
# A private top-level module (``stackcat/_name.py``) not listed above is a ground-floor helper.
PRIVATE_TOP_LEVEL_LAYER = "ground floor"

# Upward imports known and accepted, each with its reason: none today; keep it so.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    module_level: bool
    line: int


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, source: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _targets(node: ast.AST, source: str, is_package: bool, modules: set[str]) -> list[str]:
    """The stackcat modules an import statement loads (``from pkg import sub`` loads ``pkg.sub``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "stackcat"]
    if isinstance(node, ast.ImportFrom):
        module = _resolve(node, source, is_package)
        if module.split(".")[0] != "stackcat":
            return []
        subs = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in modules]
        return subs if len(subs) == len(node.names) else [module, *subs]
    return []


def _function_level(tree: ast.Module) -> set[int]:
    """ids of import nodes that do not run when the module is imported (in functions, TYPE_CHECKING)."""
    deferred: set[int] = set()
    for node in ast.walk(tree):
        body: list[ast.AST] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            body = [node]
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            body = list(node.body)
        for part in body:
            deferred.update(id(inner) for inner in ast.walk(part) if isinstance(inner, (ast.Import, ast.ImportFrom)))
    return deferred


def import_graph() -> list[Import]:
    modules = all_modules()
    names = set(modules)
    edges = []
    for source, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        deferred = _function_level(tree)
        for node in ast.walk(tree):
            for target in _targets(node, source, path.name == "__init__.py", names):
                if target != source:
                    edges.append(Import(source, target, id(node) not in deferred, node.lineno))
    return edges


def layer_of(module: str) -> int:
    best, best_length = None, -1
    for rank, prefixes in enumerate(LAYERS.values()):
        for prefix in prefixes:
            length = len(prefix.split("."))
            if (module == prefix or module.startswith(prefix + ".")) and length > best_length:
                best, best_length = rank, length
    parts = module.split(".")
    if best_length <= 1 and len(parts) == 2 and parts[1].startswith("_"):
        return list(LAYERS).index(PRIVATE_TOP_LEVEL_LAYER)
    if best_length <= 1 and module != "stackcat":
        raise AssertionError(f"module {module} is in no layer: add its prefix to LAYERS in {__file__}")
    return best


def find_cycle(edges: list[Import]) -> list[str] | None:
    graph: dict[str, list[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, []).append(edge.target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.fixture(scope="module")
def edges() -> list[Import]:
    return import_graph()


def test_the_graph_sees_both_kinds_of_import(edges):
    # guards the parser: a graph that lost an edge kind would pass everything below
    assert any(e.source.startswith("stackcat.stacking") and e.target == "stackcat.runs" and e.module_level for e in edges)
    assert any(e.source.startswith("stackcat.stacking") and e.target.startswith("stackcat.meta") and not e.module_level
               for e in edges)
    assert any(e.source == "stackcat.meta" and e.target == "stackcat.meta.rerank" for e in edges)


def test_every_module_has_a_layer():
    unplaced = []
    for module in all_modules():
        try:
            layer_of(module)
        except AssertionError as error:
            unplaced.append(str(error))
    assert not unplaced, "\n".join(unplaced)


def test_no_cycle_among_module_level_imports(edges):
    cycle = find_cycle([e for e in edges if e.module_level])
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_no_import_runs_up_a_layer(edges):
    names = list(LAYERS)
    upward = [f"{e.source}:{e.line} ({names[layer_of(e.source)]}) imports {e.target} ({names[layer_of(e.target)]})"
              for e in edges
              if layer_of(e.target) > layer_of(e.source) and (e.source, e.target) not in ALLOWED_UPWARD]
    assert not upward, "imports from a lower layer up:\n" + "\n".join(upward)


def test_the_checks_catch_what_they_look_for():
    up = [Import("stackcat.topk", "stackcat.cli", False, 1)]
    assert layer_of("stackcat.cli") > layer_of("stackcat.topk")
    assert layer_of("stackcat.features.images") == layer_of("stackcat.data")
    assert layer_of("stackcat.stacking.jobs") == list(LAYERS).index("stacking")
    assert layer_of("stackcat.models.image") == list(LAYERS).index("models")
    assert layer_of("stackcat._labels") == 0
    assert [e for e in up if layer_of(e.target) > layer_of(e.source)] == up
    looped = [Import("stackcat.a", "stackcat.b", True, 1), Import("stackcat.b", "stackcat.a", True, 1)]
    assert find_cycle(looped) == ["stackcat.a", "stackcat.b", "stackcat.a"]
    assert find_cycle(looped[:1]) is None
