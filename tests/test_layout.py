"""The house stays as drawn: docs/architecture.md names every package and module (and nothing
that is gone), tests/ mirrors the source folders, and no module or function outgrows the
limits (600 lines a module, 80 a function)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.import_view import package_dirs

ROOT = Path(__file__).parents[1]
MAP = ROOT / "docs" / "architecture.md"
MAX_MODULE, MAX_FUNCTION = 600, 80


def _sources() -> list[Path]:
    return sorted(p for folder in package_dirs().values() for p in folder.rglob("*.py")
                  if "__pycache__" not in p.parts)


def _packages() -> list[Path]:
    return sorted({p.parent for p in _sources() if p.name == "__init__.py"})


def _named_in_map() -> set[str]:
    """Every backticked path in the map: ``tasks/build/stages.py``, ``tasks/build/``."""
    return {m.rstrip("/") for m in re.findall(r"`([\w./-]+)`", MAP.read_text())
            if "/" in m or m.endswith(".py")}


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_the_map_names_every_package_and_module():
    named = _named_in_map()
    modules = [_rel(p) for p in _sources() if p.name != "__init__.py"]
    packages = [_rel(p) for p in _packages()]
    missing = [m for m in modules + packages if m not in named]
    assert not missing, f"docs/architecture.md does not name: {missing}"


def test_every_source_path_in_the_map_exists():
    """A module that moved or went away cannot stay on the map."""
    tops = tuple(f"{p.relative_to(ROOT)}/" for p in package_dirs().values())
    stale = [n for n in _named_in_map() if n.startswith(tops) and not (ROOT / n).exists()]
    assert not stale, f"docs/architecture.md names paths that do not exist: {stale}"


def test_tests_mirror_the_source_folders():
    """``tests/<folder>/...`` holds the tests of ``<folder>/...`` (``tests/sftflow/<pkg>`` of
    ``sftflow/<pkg>``); ``tests/faults`` and ``tests/contract`` are the suite's own tools."""
    tools = {"faults", "contract"}
    wrong = []
    for test in (ROOT / "tests").rglob("test_*.py"):
        folder = test.parent.relative_to(ROOT / "tests")
        if folder == Path(".") or folder.parts[0] in tools:
            continue
        if not (ROOT / folder).is_dir():
            wrong.append(_rel(test))
    assert not wrong, f"tests without a source folder of the same path: {wrong}"


def test_no_module_or_function_over_the_limits():
    too_long = []
    for path in _sources():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE:
            too_long.append(f"{_rel(path)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION:
                    too_long.append(f"{_rel(path)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, too_long
