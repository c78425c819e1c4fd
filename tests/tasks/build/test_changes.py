"""tasks.build.changes: the changes a full export snapshot shows, and the tasks it streams to
the parser (``Changes.iter_tasks``); pure, no services, no Prefect."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

from sftflow.tasks.build.changes import changes_from_snapshot
from sftflow.tasks.build.delta import task_state
from sftflow.tasks.build.incremental import ParentState, record
from sftflow.tasks.build.plan import Plan


def _task(i: int, text: str = "", response: str = "an answer",
          at: str = "2026-12-01T00:00:00Z") -> dict:
    return {"id": i, "data": {"prompt": text or f"prompt {i}"}, "updated_at": at,
            "annotations": [{"id": 1000 + i, "updated_at": at,
                             "result": [{"from_name": "response", "type": "textarea",
                                         "value": {"text": [response]}}]}]}


def _snapshot(tmp_path: Path, items: list) -> Path:
    path = tmp_path / "export.json"
    path.write_text(json.dumps(items))
    return path


def test_a_scratch_snapshot_streams_every_task_and_counts_what_is_not_one(tmp_path):
    path = _snapshot(tmp_path, [_task(1), 42, _task(2), _task(3)])
    changes = changes_from_snapshot(Plan("scratch", "first version", ParentState(version="")),
                                    path, "first version")
    assert changes.mode == "scratch" and changes.tasks == [] and changes.snapshot == path
    assert set(changes.states) == changes.reread == {1, 2, 3}
    streamed = list(changes.iter_tasks())
    assert [t if isinstance(t, int) else t["id"] for t in streamed] == [1, 42, 2, 3]
    assert changes.count_read() == 4  # the malformed element is read, and the parser counts it


def test_a_full_snapshot_streams_only_the_tasks_changed_since_the_parent(tmp_path):
    old = [_task(1), _task(2), _task(3), _task(4)]
    parent = ParentState(version="v1", tasks={t["id"]: record(task_state(t)) for t in old})
    now = [old[0], _task(2, response="an edited answer", at="2026-12-02T00:00:00Z"), old[2], _task(5)]  # 4 deleted
    changes = changes_from_snapshot(Plan("full", "asked for", parent),
                                    _snapshot(tmp_path, now), "asked for")
    assert changes.mode == "full" and changes.deleted == {4}
    assert [t["id"] for t in changes.iter_tasks()] == [2, 5]
    assert changes.count_read() == 2 and set(changes.states) == {1, 2, 3, 5}


def test_the_tasks_stream_from_the_snapshot_and_are_never_all_held(tmp_path):
    """A scratch build of 300k tasks held the whole export as Python objects (7.3 GB): the
    parser now gets them one at a time. 4,000 tasks of ~2 KB: holding them all would take
    over 10 MB of the Python heap; streaming stays within the reader's buffer."""
    filler = "word " * 400
    path = _snapshot(tmp_path, [_task(i, f"{i} {filler}") for i in range(1, 4001)])
    changes = changes_from_snapshot(Plan("scratch", "", ParentState(version="")), path, "")
    tracemalloc.start()
    try:
        seen = sum(1 for _ in changes.iter_tasks())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    held = len(list(changes.iter_tasks()))  # what a list would hold, for scale
    assert seen == held == 4000
    assert peak < 6 * 2**20, f"peak {peak / 2**20:.1f} MiB while streaming 4,000 tasks"
