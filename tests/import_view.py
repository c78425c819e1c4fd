"""Run ``lint-imports`` over the package as it is installed: ``python tests/import_view.py``.

The design's top-level folders (``tasks/``, ``flows/``, ``infra/``, ``deployments/``) are
mapped into the ``sftflow`` package by ``[tool.setuptools] package-dir``; import-linter (grimp)
finds a package's modules by walking its folder on disk, so in a checkout it would see only
``sftflow/``. This copies the sources into ``build/import-view/`` laid out as the wheel lays
them out (the same mapping, read from pyproject.toml), and runs ``lint-imports`` there with the
project's contracts. ``make test`` runs it first. Exit status: lint-imports' own.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIEW = ROOT / "build" / "import-view"


def package_dirs(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, Path]:
    """``{dotted package: source folder}`` of every mapped root, from pyproject.toml."""
    mapping = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items()}


def build_view(dest: Path = VIEW) -> Path:
    """A copy of the sources laid out as installed: ``dest/sftflow/tasks/...``."""
    shutil.rmtree(dest, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name, folder in sorted(package_dirs().items()):  # parents before children
        shutil.copytree(folder, dest.joinpath(*name.split(".")), ignore=ignore, dirs_exist_ok=True)
    return dest


def main() -> int:
    view = build_view()
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.call([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=view)


if __name__ == "__main__":
    sys.exit(main())
