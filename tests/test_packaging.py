"""One path per module. The design's top-level folders (``tasks/``, ``flows/``, ``infra/``,
``deployments/``) hold the code and are mapped into the one package, ``sftflow``, by
``[tool.setuptools] package-dir``: the built wheel holds only ``sftflow``; an editable install
maps the same folders, so ``__file__``, tracebacks and git name the same file; nothing named
``tasks`` is importable from an install; and the import contracts catch a module that imports
a folder as a top-level package (a second copy of it)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.import_view import build_view, package_dirs

ROOT = Path(__file__).parents[1]
UV = Path(sys.executable).parent / "uv"
FOLDERS = ("tasks", "flows", "infra", "deployments")
needs_uv = pytest.mark.skipif(not UV.exists(), reason="uv is installed by `make install`")
# The tests that build from the checkout itself write into it: setuptools' egg-info and build/
# (the editable install, the wheel), build/import-view (the contracts). Under xdist they run
# in one worker, one after the other, as in a serial run.
in_checkout = pytest.mark.xdist_group("checkout-build")


def _run(*argv, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], check=check, capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def _modules() -> dict[str, Path]:
    """``{dotted module: file}`` for every module of the package, from the mapped folders."""
    out = {}
    for name, folder in package_dirs().items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([name, *parts])] = path
    return out


def test_no_symlink_in_the_package_or_its_folders():
    links = [p for top in ("sftflow", *FOLDERS) for p in [ROOT / top, *(ROOT / top).rglob("*")]
             if p.is_symlink()]
    assert links == []


def test_the_declared_packages_are_exactly_the_folders():
    """``packages`` in pyproject.toml lists every folder with an ``__init__.py``, no more."""
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {m for m, p in _modules().items() if p.name == "__init__.py"}
    assert declared == found


def test_every_module_imports_from_its_own_tracked_file():
    """The path Python imports a module from (``__file__``, every traceback) is the path git
    tracks: no module has a second path."""
    tracked = set(_run("git", "ls-files", cwd=ROOT).stdout.split())
    modules = _modules()
    assert len(modules) > 90
    for dotted, path in modules.items():
        origin = Path(importlib.util.find_spec(dotted).origin)
        assert origin == path, dotted
        assert str(path.relative_to(ROOT)) in tracked, f"{path} is not tracked by git"


@needs_uv
@in_checkout
def test_fresh_editable_install_maps_the_folders_and_nothing_else(tmp_path):
    venv = tmp_path / "venv"
    _run(UV, "venv", "-q", "-p", sys.executable, venv)
    python = venv / "bin" / "python"
    _run(UV, "pip", "install", "-q", "--python", python, "--no-deps", "-e", ROOT)
    # Run outside the checkout: the install, not the working directory, finds the package.
    where = _run(python, "-c", "import importlib.util as u; "
                 "print(u.find_spec('sftflow.tasks.versions.commit').origin)", cwd=tmp_path)
    assert Path(where.stdout.strip()) == ROOT / "tasks" / "versions" / "commit.py"
    for top in FOLDERS:
        tried = _run(python, "-c", f"import {top}", cwd=tmp_path, check=False)
        assert tried.returncode == 1 and "ModuleNotFoundError" in tried.stderr, top


@needs_uv
@in_checkout
def test_wheel_installs_only_the_sftflow_namespace_and_runs(tmp_path):
    _run(UV, "build", "--wheel", "-q", "-o", tmp_path / "dist", ROOT)
    wheel = next((tmp_path / "dist").glob("sftflow-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"sftflow"}
    for path in ("sftflow/flows/ingest.py", "sftflow/tasks/versions/commit.py",
                 "sftflow/deployments/prefect.yaml", "sftflow/demo/sample_prompts.jsonl"):
        assert path in names
    wanted = {m.replace(".", "/") + ("/__init__.py" if p.name == "__init__.py" else ".py")
              for m, p in _modules().items()}
    assert wanted <= names, sorted(wanted - names)

    venv = tmp_path / "venv"
    _run(UV, "venv", "-q", "-p", sys.executable, venv)
    # The locked versions (from the package cache `make install` filled), core dependencies only.
    _run(UV, "pip", "install", "-q", "--python", venv / "bin" / "python", wheel,
         "-c", ROOT / "requirements" / "lock.txt")
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert not set(FOLDERS) & {p.name for p in site.iterdir()}
    help_text = _run(venv / "bin" / "sftflow", "--help", cwd=tmp_path).stdout
    assert "stack" in help_text and "ingest" in help_text
    flows = _run(venv / "bin" / "python", "-c",
                 "import sftflow.flows.ingest as m; print(m.ingest_prompts.name)", cwd=tmp_path)
    assert flows.stdout.strip() == "ingest-prompts"


def test_import_contracts_catch_a_top_level_folder_import(tmp_path):
    """``from tasks.adapters.s3 import S3`` in a module would load a second copy of that
    module; the contracts that ``make test`` runs refuse it and name the line."""
    view = build_view(tmp_path / "view")
    victim = view / "sftflow" / "flows" / "ingest.py"
    victim.write_text(victim.read_text() + "\nfrom tasks.adapters.s3 import S3  # noqa\n")
    lint = Path(sys.executable).with_name("lint-imports")
    out = _run(lint, "--config", ROOT / "pyproject.toml", cwd=view, check=False)
    assert out.returncode != 0
    assert "sftflow.flows.ingest -> tasks" in out.stdout


@in_checkout
def test_import_contracts_catch_a_layer_violation_in_a_mapped_folder(tmp_path):
    """The mapped folders are optional layers (a plain ``lint-imports`` at the root sees only
    ``sftflow/``); over the installed layout they are present, and a stage importing a flow
    breaks the layers contract."""
    view = build_view(tmp_path / "view")
    victim = view / "sftflow" / "tasks" / "build" / "plan.py"
    victim.write_text(victim.read_text() + "\nimport sftflow.flows.ingest  # noqa\n")
    lint = Path(sys.executable).with_name("lint-imports")
    out = _run(lint, "--config", ROOT / "pyproject.toml", cwd=view, check=False)
    assert out.returncode != 0
    assert "sftflow.tasks.build.plan -> sftflow.flows.ingest" in out.stdout


def test_import_contracts_hold_on_the_package():
    assert subprocess.call([sys.executable, str(ROOT / "tests" / "import_view.py")],
                           stdout=subprocess.DEVNULL, timeout=300) == 0
