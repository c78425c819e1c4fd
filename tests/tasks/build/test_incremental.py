"""What a build reads again, and the counter arithmetic that proves a change list complete."""

from __future__ import annotations

from sftflow.tasks.build.delta import TaskState, ls_time, reconcile, task_state
from sftflow.tasks.build.incremental import changed_tasks, orphan_tasks, record


def _task(tid: int, *anns: tuple[int, str, bool]) -> dict:
    return {"id": tid, "data": {"prompt": "p"},
            "annotations": [{"id": a, "updated_at": t, "was_cancelled": c} for a, t, c in anns]}


def test_task_state_is_the_same_whichever_serializer_wrote_the_times():
    a = task_state(_task(1, (7, "2026-11-24T10:05:35.363220Z", False)))
    b = task_state(_task(1, (7, "2026-11-24 10:05:35.363220+00:00", False)))
    assert a == b and a.n_annotations == 1 and a.n_cancelled == 0
    assert task_state(_task(1, (7, "2026-11-24T10:05:36Z", False))).state != a.state
    assert ls_time("2026-11-24T10:05:35Z") == "2026-11-24T10:05:35.000000Z"


def test_reconcile_accepts_the_parent_plus_the_delta_and_names_what_disagrees():
    parent = {1: TaskState(1, "a", 1, 0), 2: TaskState(2, "b", 1, 0), 3: TaskState(3, "c", 0, 0)}
    changed = {2: TaskState(2, "b2", 2, 1), 4: TaskState(4, "d", 1, 0)}
    ok = {"task_number": 4, "total_annotations_number": 4, "skipped_annotations_number": 1}
    assert reconcile(parent, changed, [], ok) is None
    assert reconcile(parent, changed, [3], {**ok, "task_number": 3}) is None
    why = reconcile(parent, changed, [], {**ok, "task_number": 3})
    assert why and why.startswith("tasks: Label Studio says 3")


def test_changed_deleted_and_orphaned_tasks_are_read_again():
    parent = {1: record(TaskState(1, "a", 1, 0), "train"),
              2: record(TaskState(2, "b", 1, 0), "train", ["00000000000000aa"]),
              3: record(TaskState(3, "c", 1, 0), "eval", ["00000000000000bb"])}
    changed = changed_tasks(parent, {1: TaskState(1, "a2", 1, 0), 9: TaskState(9, "n", 1, 0)},
                            deleted=[3])
    assert changed == {1, 9, 3}
    # task 2's row duplicated task 1's kept row (key aa), which has left: task 2 is re-read
    assert orphan_tasks(parent, changed, retained_keys={"00000000000000bb"}) == {2}
    assert orphan_tasks(parent, changed, retained_keys={"00000000000000aa"}) == set()
