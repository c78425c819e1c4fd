"""Migrated database templates (infra/templates.py): made once, under a lock, published whole,
copied without overwriting; and the stack's own use of them (tests/infra/test_stack.py and
tests/tasks/build/test_export_restart.py start Label Studio and Prefect from them)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sftflow.core.errors import SftflowError
from sftflow.infra.templates import ensure_template, installed_version, seed


def _migrate(db: Path) -> None:
    con = sqlite3.connect(db)
    con.execute("create table migrated (step integer)")
    con.executemany("insert into migrated values (?)", [(i,) for i in range(3)])
    con.commit()
    con.close()


def _rows(db: Path) -> list[int]:
    con = sqlite3.connect(db)
    try:
        return [r[0] for r in con.execute("select step from migrated order by step")]
    finally:
        con.close()


def test_a_template_is_made_once_and_then_reused(tmp_path):
    calls: list[Path] = []

    def migrate(db: Path) -> None:
        calls.append(db)
        _migrate(db)

    first = ensure_template(tmp_path, "svc-1.0", migrate)
    again = ensure_template(tmp_path, "svc-1.0", migrate)
    assert first == again == tmp_path / "svc-1.0.sqlite3"
    assert len(calls) == 1 and _rows(first) == [0, 1, 2]
    # The scratch database it was made in is gone; only the template and its lock remain.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc-1.0.lock", "svc-1.0.sqlite3"]


def test_a_failed_migration_publishes_nothing(tmp_path):
    def broken(db: Path) -> None:
        _migrate(db)
        raise SftflowError("migration 7 failed")

    with pytest.raises(SftflowError, match="migration 7"):
        ensure_template(tmp_path, "svc-1.0", broken)
    with pytest.raises(SftflowError, match="left no database"):
        ensure_template(tmp_path, "svc-1.0", lambda db: None)
    assert not (tmp_path / "svc-1.0.sqlite3").exists()
    assert ensure_template(tmp_path, "svc-1.0", _migrate).is_file()  # a later try makes it


def test_concurrent_makers_migrate_once(tmp_path):
    """Four processes ask for the same missing template at once: one migrates (slowly), the
    others wait on the lock and take its result."""
    child = textwrap.dedent(f"""
        import sqlite3, sys, time
        from pathlib import Path
        from sftflow.infra.templates import ensure_template
        def migrate(db):
            with open({str(tmp_path / 'calls')!r}, 'a') as f:
                f.write('x')
            time.sleep(1)
            con = sqlite3.connect(db); con.execute('create table migrated (step integer)')
            con.commit(); con.close()
        print(ensure_template(Path(sys.argv[1]), 'svc-1.0', migrate))
    """)
    folder = tmp_path / "templates"
    procs = [subprocess.Popen([sys.executable, "-c", child, str(folder)], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert set(outs) == {str(folder / "svc-1.0.sqlite3")}
    assert (tmp_path / "calls").read_text() == "x"


def test_seed_copies_and_never_overwrites(tmp_path):
    template = ensure_template(tmp_path / "t", "svc-1.0", _migrate)
    target = tmp_path / "stack" / "data" / "db.sqlite3"
    assert seed(template, target) is True and _rows(target) == [0, 1, 2]
    con = sqlite3.connect(target)
    con.execute("insert into migrated values (9)")
    con.commit()
    con.close()
    assert seed(template, target) is False and _rows(target) == [0, 1, 2, 9]  # data kept
    assert _rows(template) == [0, 1, 2]  # the template is never written through a copy


def test_installed_version_reads_the_dist_info_without_running_anything(tmp_path):
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    (site / "label_studio-1.23.2.dist-info").mkdir(parents=True)
    (tmp_path / "venv" / "bin").mkdir()
    python = tmp_path / "venv" / "bin" / "python"
    python.symlink_to(sys.executable)  # as in a venv: resolving it would leave the venv
    assert installed_version(python, "label-studio") == "label-studio-1.23.2"
    assert installed_version(python, "prefect") is None  # migrated at its start instead
