"""dbs_hvd's modules import on their own, and none imports another back (no import circle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dbs_hvd"
LIBRARY_ONLY = "dbs_hvd.train"  # the dbs-train application: the library never imports it


def _module_name(path: Path) -> str:
    """``dbs_hvd/train/cli.py`` -> ``dbs_hvd.train.cli``; a package's ``__init__.py`` -> the package."""
    parts = ["dbs_hvd", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
MODULES = sorted(FILES)


def _known(name: str) -> str:
    """The dbs_hvd module ``name`` names, or the nearest package or module above it."""
    while name not in FILES:
        name = name.rpartition(".")[0]
    return name


def _imported(name: str) -> set[str]:
    """The dbs_hvd modules module ``name`` imports (a name a package holds counts as the package).

    Imports inside functions count as well: a circle closed by a deferred import
    still makes each module depend on the other, and a deferred import is also
    how such a circle is usually hidden.
    """
    path = FILES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "dbs_hvd":
                    found.add(_known(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - (node.level - 1)])
                if node.module:
                    base += "." + node.module
            elif node.module and node.module.split(".")[0] == "dbs_hvd":
                base = node.module
            else:
                continue
            for alias in node.names:
                found.add(_known(f"{base}.{alias.name}"))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each dbs_hvd module (dotted name) and the dbs_hvd modules it imports."""
    return {name: _imported(name) for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as a path that returns to its start, or None (depth-first)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_a_circle_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_graph_sees_relative_absolute_and_deferred_imports():
    graph = import_graph()
    assert {"dbs_hvd.train.trainer", "dbs_hvd.comm", "dbs_hvd.plan"} <= graph["dbs_hvd.train.cli"]
    assert "dbs_hvd.train.elastic" in graph["dbs_hvd.train.cli"]  # imported inside a function
    assert "dbs_hvd.train.trainer" in graph["dbs_hvd.train.elastic"]
    assert {"dbs_hvd.train.checkpoint", "dbs_hvd.train.data"} <= graph["dbs_hvd.train.trainer"]


def test_no_import_circle_between_dbs_hvd_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_library_never_imports_the_application():
    offending = {
        name: sorted(t for t in targets if t == LIBRARY_ONLY or t.startswith(LIBRARY_ONLY + "."))
        for name, targets in import_graph().items()
        if not (name == LIBRARY_ONLY or name.startswith(LIBRARY_ONLY + "."))
    }
    assert not {name: t for name, t in offending.items() if t}, offending


def test_every_module_imports_on_its_own():
    # One interpreter, dbs_hvd dropped from sys.modules before each module, so
    # each is imported first (torch and Horovod stay loaded: that is their cost).
    script = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        f"for name in {[m for m in MODULES if m != 'dbs_hvd']!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'dbs_hvd' or m.startswith('dbs_hvd.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=-3))\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
