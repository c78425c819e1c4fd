"""A Label Studio restart during an export snapshot (issue #18, item 13a), for real: a Label
Studio of this test's own (its own folder and port) is killed (-9) while it builds the snapshot
inside the create request, then started again. The snapshot it was building stays
``in_progress`` forever; the build notices and makes a new one, within its deadline, instead
of polling the dead one until the deadline passes."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from typing import Any

import pytest

from sftflow.tasks.runtime.polling import Backoff, wait_until
from tests.conftest import unique
from tests.tasks._datasets import annotation, make_project

pytestmark = pytest.mark.integration

#: This test's Label Studio: its own port, in the test stacks' range (tests/infra/test_stack.py
#: uses BASE .. BASE + 306 and BASE + 1000 ..), below the ephemeral ports.
PORT = int(os.environ.get("SFTFLOW_TEST_STACK_BASE", "21100")) + 600
TASKS = 3000  # enough for the snapshot to take seconds: the kill lands while it is built
DEADLINE_S = 300.0


@pytest.fixture()
def own_labelstudio(settings, tmp_path):
    from sftflow.infra.stack import LocalStack
    from sftflow.tasks.adapters.labelstudio import build_labelstudio

    url = f"http://127.0.0.1:{PORT}"
    mine = settings.model_copy(update={
        # On SQLite whatever the suite's stack runs on: its database is read below, and on
        # PostgreSQL it would be the suite's own Label Studio database.
        "stack": settings.stack.model_copy(update={"dir": tmp_path / "stack", "postgres": False,
                                                   "label_studio_port": PORT}),
        "labelstudio": settings.labelstudio.model_copy(update={"url": url}),
    })
    local = LocalStack(mine)
    local.up(["labelstudio"], timeout_s=400)
    try:
        yield local, build_labelstudio(mine.labelstudio)
    finally:
        local.down(["labelstudio"])


def export_states(local) -> dict[int, str]:
    """The snapshots' states as Label Studio's own database holds them (read-only)."""
    db = local._data_path("labelstudio") / "label_studio.sqlite3"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
    try:
        return dict(con.execute("select id, status from data_export_export").fetchall())
    except sqlite3.OperationalError:  # locked or not there yet: look again
        return {}
    finally:
        con.close()


def kill_labelstudio(local) -> None:
    rec = local._read_pid("labelstudio")
    assert rec is not None
    os.killpg(rec.pid, signal.SIGKILL)  # its own process group: the server we started
    from sftflow.infra.processes import port_in_use

    assert wait_until(lambda: local._read_pid("labelstudio") is None
                      and not port_in_use("127.0.0.1", PORT), timeout_s=60,
                      backoff=Backoff(0.1, 0.5))


def test_a_restart_during_the_snapshot_costs_a_new_snapshot_not_the_deadline(own_labelstudio):
    from sftflow.tasks.build.export import create_snapshot, download_snapshot, parse_export_file

    local, ls = own_labelstudio
    project = make_project(ls, unique("t-restart"), [
        {"data": {"prompt": f"prompt {i}"}, "annotations": [annotation(f"answer {i}")]}
        for i in range(TASKS)])
    out: dict[str, Any] = {}

    def build() -> None:
        start = time.monotonic()
        try:
            out["snapshot"] = create_snapshot(ls, project.id, timeout_s=DEADLINE_S)
        except Exception as err:  # noqa: BLE001 - reported by the assertions below
            out["error"] = err
        out["seconds"] = time.monotonic() - start

    builder = threading.Thread(target=build, daemon=True)
    builder.start()
    building = wait_until(lambda: [i for i, s in export_states(local).items()
                                   if s == "in_progress"], timeout_s=120,
                          backoff=Backoff(0.01, 0.05))
    assert building, f"no snapshot in progress: {export_states(local)}"
    kill_labelstudio(local)
    cut = {i: s for i, s in export_states(local).items() if i in building}
    assert set(cut.values()) == {"in_progress"}, (
        f"the kill came after the snapshot was built ({cut}): the test needs more tasks")
    restarted_at = time.monotonic()
    local.up(["labelstudio"], timeout_s=400)  # the restart
    restart_s = time.monotonic() - restarted_at
    builder.join(DEADLINE_S + 60)
    assert "error" not in out, f"{out.get('error')!r} after {out.get('seconds', 0):.0f} s"
    snapshot = out["snapshot"]
    assert snapshot.export_id not in building  # a new snapshot, not the one cut short
    # A retry, not the deadline: done within a minute of Label Studio being back.
    assert out["seconds"] < restart_s + 120, (out["seconds"], restart_s)
    rows = parse_export_file(download_snapshot(ls, snapshot, local.dir / "export.json")).rows
    assert len(rows) == TASKS
