"""The shape of the code: rooms that import only downward, no import cycles, small modules.

Reads every module under gpud/ with `ast` (imports inside functions and TYPE_CHECKING blocks count too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "gpud"

# Higher rooms may import lower ones, never the reverse (data flows downward: api -> work -> gpu/... -> worker).
RANKS = {
    "gpud.__main__": 8,
    "gpud.daemon": 7,
    "gpud.api": 6,
    "gpud.fleet": 5,  # fleet mode: used by the api and the daemon, uses work, gpu and settings
    "gpud.work": 4,
    "gpud.gpu": 3,
    "gpud.modelstore": 3,
    "gpud.runtime": 3,
    "gpud.worker": 2,
    "gpud.settings": 1,
    "gpud.state": 1,
    "gpud.errors": 0,
    "gpud.clock": 0,
    "gpud.metrics": 0,
    "gpud": 0,
}
MAX_MODULE_LINES = 400
MAX_TOP_LEVEL_MODULES = 6


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The gpud modules `name` imports (`from pkg import sub` counts as importing the submodule)."""
    tree = ast.parse(MODULES[name].read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "gpud")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gpud":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found - {name}


GRAPH = {name: imports_of(name) for name in MODULES}


def room_of(name: str) -> str:
    """The longest RANKS prefix of a module name."""
    parts = name.split(".")
    for size in range(len(parts), 0, -1):
        prefix = ".".join(parts[:size])
        if prefix in RANKS:
            return prefix
    raise AssertionError(f"{name} belongs to no room; add its package to RANKS")


def test_every_module_is_in_a_room() -> None:
    for name in MODULES:
        room_of(name)


def test_nothing_imports_upward() -> None:
    upward = [
        f"{name} ({room_of(name)}) imports {target} ({room_of(target)})"
        for name, targets in GRAPH.items()
        for target in targets
        if RANKS[room_of(target)] > RANKS[room_of(name)]
    ]
    assert not upward, "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_worker_sdk_uses_only_the_standard_library() -> None:
    # It runs inside worker images, where gpud is not installed.
    assert GRAPH["gpud.worker.sdk"] == set()


def test_few_modules_at_the_top() -> None:
    top = sorted(p.name for p in ROOT.glob("*.py") if p.name not in {"__init__.py", "__main__.py"})
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_small(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines"
