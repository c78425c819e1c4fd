"""Migrated SQLite databases kept as templates: a new stack folder (or a test's own server) starts
from a copy instead of running every migration again.

Measured on this project's 2-core machines: Label Studio 1.23 on a fresh SQLite database takes
~33 s of CPU to start (its ~400 migrations), ~4 s on a migrated one; ``prefect server database
upgrade`` takes ~9 s of CPU on a fresh one. The test suite starts a dozen such servers.

A template is made once per installed version (``label-studio-1.23.2``, ``prefect-3.8.8``):
a fresh database, migrated by the service's own command, before any user, organisation or
token exists, so a copy carries nothing of the stack that made it. It lives under
``stack.template_dir`` (default ``~/.cache/sftflow/templates``); ``stack.templates = false``
migrates every new database, as before. Concurrent makers (parallel test workers) serialise on
a lock file; a template is published by an atomic rename, so a reader never sees half of one.
PostgreSQL stacks do not use them: each stack's PostgreSQL is a fresh cluster anyway.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from sftflow.core.errors import SftflowError


def installed_version(python: str | Path, dist: str) -> str | None:
    """``<dist>-<version>`` of a distribution installed for ``python`` (its dist-info folder;
    nothing is run), or None where there is none (an executable outside a virtual environment:
    its database is then migrated at its start, as without templates)."""
    venv = Path(python).absolute().parent.parent  # not resolved: bin/python links out of the venv
    found = sorted(venv.glob(f"lib/python*/site-packages/{dist.replace('-', '_')}-*.dist-info"))
    return found[-1].name.removesuffix(".dist-info").replace("_", "-") if found else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _backup(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database (its WAL included), through SQLite's backup."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


def ensure_template(folder: Path, name: str, migrate: Callable[[Path], None]) -> Path:
    """The template ``<folder>/<name>.sqlite3``, made by ``migrate(fresh_db_path)`` the first
    time (under a lock, published by rename)."""
    template = folder / f"{name}.sqlite3"
    if template.is_file():
        return template
    with _locked(folder / f"{name}.lock"):
        if template.is_file():  # another process made it while this one waited
            return template
        with tempfile.TemporaryDirectory(dir=folder, prefix=f".{name}-") as scratch:
            fresh = Path(scratch) / "fresh.sqlite3"
            migrate(fresh)
            if not fresh.is_file():
                raise SftflowError(f"making the {name} template left no database at {fresh}")
            staged = Path(scratch) / "template.sqlite3"
            _backup(fresh, staged)
            os.replace(staged, template)
    return template


def seed(template: Path, target: Path) -> bool:
    """Copy ``template`` to ``target`` unless a database is already there; True if copied."""
    if target.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(template, partial)
    os.replace(partial, target)
    return True


def _run(argv: list[str], env: dict[str, str], what: str, cwd: Path | None = None) -> None:
    done = subprocess.run(argv, env={**os.environ, **env}, cwd=cwd, capture_output=True,
                          text=True, timeout=600, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-2000:]
        raise SftflowError(f"{what} failed (exit {done.returncode}): {tail}")


def labelstudio_migrator(python: str | Path, env: dict[str, str]) -> Callable[[Path], None]:
    """Migrates a fresh Label Studio SQLite database with Label Studio's own ``manage.py
    migrate`` (what ``label-studio start`` runs on an empty database), in the environment the
    service is started with (its settings module), and nothing else: no user is created."""
    def migrate(db: Path) -> None:
        manage = next(Path(python).absolute().parent.parent.glob(
            "lib/python*/site-packages/label_studio/manage.py"), None)
        if manage is None:
            raise SftflowError(f"label_studio/manage.py not found next to {python}")
        _run([str(python), str(manage), "migrate", "--no-color", "-v", "0"],
             {**env, "DATABASE_NAME": str(db), "LABEL_STUDIO_BASE_DATA_DIR": str(db.parent)},
             "Label Studio's migrations", cwd=db.parent)
    return migrate


def prefect_migrator(prefect: str | Path) -> Callable[[Path], None]:
    """Migrates a fresh Prefect SQLite database with ``prefect server database upgrade``."""
    def migrate(db: Path) -> None:
        _run([str(prefect), "server", "database", "upgrade", "-y"],
             {"PREFECT_HOME": str(db.parent), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
              "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}"},
             "Prefect's migrations")
    return migrate


def labelstudio_template(folder: Path, python: str | Path, env: dict[str, str]) -> Path | None:
    """Label Studio's template for the installation of ``python``, made if missing; None for
    an executable outside a virtual environment."""
    name = installed_version(python, "label-studio")
    return ensure_template(folder, name, labelstudio_migrator(python, env)) if name else None


def prefect_template(folder: Path, prefect: str | Path) -> Path | None:
    """Prefect's template for the installation of the ``prefect`` executable, made if missing;
    None for an executable outside a virtual environment."""
    name = installed_version(Path(prefect).parent / "python", "prefect")
    return ensure_template(folder, name, prefect_migrator(prefect)) if name else None
