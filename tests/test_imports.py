"""dbs_hvd's modules import on their own, and none imports another back (no import circle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dbs_hvd"
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))


def _imported(path: Path) -> set[str]:
    """The dbs_hvd modules ``path`` imports ("__init__" for names the package itself holds).

    Imports inside functions count as well: a circle closed by a deferred import
    still makes each module depend on the other, and a deferred import is also
    how such a circle is usually hidden.
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "dbs_hvd":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                raise AssertionError(f"{path.name}: dbs_hvd is flat, got a level-{node.level} import")
            if node.level == 1:
                base = node.module
            elif node.module and node.module.split(".")[0] == "dbs_hvd":
                base = node.module.partition(".")[2] or None
            else:
                continue
            if base:
                found.add(base.split(".")[0])
            else:  # from . import name: a module, or a name the package's __init__ holds
                found.update(a.name if a.name in MODULES else "__init__" for a in node.names)
    found.discard(path.stem)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each dbs_hvd module (by file stem) and the dbs_hvd modules it imports."""
    return {name: _imported(PACKAGE / f"{name}.py") for name in MODULES}


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
    assert {"trainer", "comm", "plan"} <= graph["cli"]
    assert "elastic" in graph["cli"]  # imported inside a function
    assert "trainer" in graph["elastic"]


def test_no_import_circle_between_dbs_hvd_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_every_module_imports_on_its_own():
    # One interpreter, dbs_hvd dropped from sys.modules before each module, so
    # each is imported first (torch and Horovod stay loaded: that is their cost).
    script = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        f"for name in {[m for m in MODULES if m != '__init__']!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'dbs_hvd' or m.startswith('dbs_hvd.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module('dbs_hvd.' + name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=-3))\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
