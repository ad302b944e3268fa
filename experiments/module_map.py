"""The package's module map at a git revision: modules, lines, layer, imports; upward edges and cycles.

Used for issue 14's before/after map. The layers are the ones tests/test_architecture.py
checks today, applied to the tree of any revision (a module at an old path is placed
by the same prefixes).

    python experiments/module_map.py                # the working tree
    python experiments/module_map.py --rev 1029685  # an older commit
    python experiments/module_map.py --rev 1029685 --compare HEAD
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import test_architecture as graph  # noqa: E402


def package_at(rev: str | None, into: Path) -> Path:
    """The stackcat/ folder of ``rev`` unpacked under ``into`` (None: the working tree)."""
    if rev is None:
        return REPO / "stackcat"
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "stackcat"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "stackcat"


def module_map(package: Path) -> dict:
    graph.PACKAGE_DIR = package
    edges = graph.import_graph()
    names = list(graph.LAYERS)
    rows = []
    for module, path in graph.all_modules().items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        imports = sorted({e.target for e in edges if e.source == module})
        rows.append((module, lines, names[graph.layer_of(module)], len(imports)))
    upward = sorted({(e.source, e.target) for e in edges if graph.layer_of(e.target) > graph.layer_of(e.source)})
    cycle = graph.find_cycle([e for e in edges if e.module_level])
    return {"rows": rows, "upward": upward, "cycle": cycle}


def print_map(title: str, found: dict) -> None:
    rows = found["rows"]
    print(f"## {title}: {len(rows)} modules, {sum(r[1] for r in rows):,} lines\n")
    print("| module | lines | layer | imports of stackcat modules |\n|---|---:|---|---:|")
    for module, lines, layer, n_imports in rows:
        print(f"| {module} | {lines} | {layer} | {n_imports} |")
    print(f"\nupward imports: {len(found['upward'])}")
    for source, target in found["upward"]:
        print(f"- {source} -> {target}")
    print(f"module-level cycle: {' -> '.join(found['cycle']) if found['cycle'] else 'none'}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default=None, help="git revision (default: the working tree)")
    parser.add_argument("--compare", default=None, help="a second revision ('.' for the working tree)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print_map(args.rev or "working tree", module_map(package_at(args.rev, Path(tmp) / "a")))
        if args.compare:
            rev = None if args.compare == "." else args.compare
            print_map(args.compare, module_map(package_at(rev, Path(tmp) / "b")))


if __name__ == "__main__":
    main()
