"""Which tasks a build reads again, and how it knows the list is complete.

``read_changes`` is the incremental export: the tasks updated since the parent's watermark
(a light listing, then only the changed tasks whole), reconciled against the project
counters, deleted tasks found by bisecting id counts. When that cannot be proven, it asks
for a full export, and ``changes_from_snapshot`` reads the changes from the downloaded
snapshot instead. Either way the result is a ``Changes``: the tasks to parse, every state
seen, deletions, and the tasks whose parent rows leave.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftflow.tasks.adapters.labelstudio import PROMPT_NAME
from sftflow.tasks.build.delta import (
    TaskState,
    fetch_tasks_task,
    find_deleted_task,
    list_task_ids_task,
    ls_time,
    reconcile,
    task_state,
    watermark,
)
from sftflow.tasks.build.export import iter_json_array
from sftflow.tasks.build.incremental import changed_tasks, orphan_tasks
from sftflow.tasks.build.plan import BuildMode, Plan
from sftflow.tasks.runtime.declare import compute_task, io_task
from sftflow.tasks.runtime.progress import PhaseTimer
from sftflow.tasks.versions.rows import Exclusion

#: Label Studio project counters recorded with every version (the next build's baseline).
PROJECT_COUNTERS = ("task_number", "num_tasks_with_annotations", "total_annotations_number",
                    "finished_task_number", "skipped_annotations_number")


def read_counters(ls: Any, project_id: int) -> dict[str, int]:
    """The project counters a build reconciles its change list against (one request)."""
    project = ls.projects.get(id=int(project_id))
    return {k: int(getattr(project, k, 0) or 0) for k in PROJECT_COUNTERS}


@dataclass
class Changes:
    """The tasks a build reads again, and what it learnt about the project."""

    mode: BuildMode
    reason: str
    tasks: list[dict[str, Any]]  # the tasks to parse (changed, new, orphaned), whole
    states: dict[int, TaskState]  # current states of those tasks (all tasks on a full export)
    deleted: set[int]
    reread: set[int]  # changed or deleted or orphaned: their parent rows leave
    watermark: str
    export: dict[str, Any] = field(default_factory=dict)  # snapshot id and time, requests
    needs_export: bool = False  # the change list is not proven: take a full export


def _reread(plan: Plan, states: Mapping[int, TaskState], deleted: set[int]) -> set[int]:
    changed = changed_tasks(plan.parent.tasks, states, deleted)
    kept = {r["cluster_id"] for r in plan.parent.rows if r["task_id"] not in changed}
    return changed | orphan_tasks(plan.parent.tasks, changed, kept)


def _reread(plan: Plan, states: Mapping[int, TaskState], deleted: set[int]) -> set[int]:
    changed = changed_tasks(plan.parent.tasks, states, deleted)
    kept = {r["cluster_id"] for r in plan.parent.rows if r["task_id"] not in changed}
    return changed | orphan_tasks(plan.parent.tasks, changed, kept)


def read_changes(ls: Any, project_id: int, plan: Plan, *,
                 prompt_name: str = PROMPT_NAME) -> Changes:
    """The incremental export: tasks updated since the parent's watermark, checked against
    the project counters, deleted tasks found by listing ids when the counts say some are
    gone. When the plan is not incremental, or the counters do not reconcile, the answer asks
    for a full export (``needs_export``, with the reason), which the flow then takes and
    hands to :func:`changes_from_snapshot`."""
    reason = plan.reason
    if plan.mode == "incremental":
        clock = PhaseTimer()  # its laps show where an incremental export's seconds go
        before = read_counters(ls, project_id)
        clock.lap("counters")
        seen = fetch_tasks_task(ls, project_id, updated_after=plan.parent.source["watermark"],
                           light=True)
        clock.lap("list")
        known = plan.parent.tasks
        stale = sorted(int(t["id"]) for t in seen.tasks if int(t["id"]) not in known
                       or not known[int(t["id"])].get("updated_at")
                       or known[int(t["id"])]["updated_at"] != ls_time(t.get("updated_at")))
        delta = fetch_tasks_task(ls, project_id, ids=stale)
        delta.server_time = seen.server_time
        clock.lap("fetch")
        now = read_counters(ls, project_id)
        clock.lap("counters")
        states = {int(t["id"]): task_state(t, prompt_name) for t in delta.tasks}
        deleted: set[int] = set()
        why = "the project changed during the reading" if now != before else reconcile(
            plan.parent.states(), states, deleted, now)
        if why and now == before:
            expected = set(plan.parent.tasks) | set(states)
            found = find_deleted_task(ls, project_id, expected)
            deleted = found if found is not None else expected - list_task_ids_task(ls, project_id)
            why = reconcile(plan.parent.states(), states, deleted, now)
            clock.lap("deleted")
        if not why:
            reread = _reread(plan, states, deleted)
            orphans = sorted(reread - set(states) - deleted)
            extra = fetch_tasks_task(ls, project_id, ids=orphans).tasks if orphans else []
            clock.lap("fetch")
            states.update({int(t["id"]): task_state(t, prompt_name) for t in extra})
            by_id = {int(t["id"]): t for t in delta.tasks + extra}
            return Changes("incremental", "", [by_id[t] for t in sorted(reread) if t in by_id],
                           states, deleted, reread, watermark(delta.server_time),
                           {"requests": seen.requests + delta.requests,
                            "tasks_listed": len(seen.tasks), "tasks_fetched": len(delta.tasks),
                            "seconds": clock.seconds()})
        reason = f"counters do not reconcile ({why})"
    mode: BuildMode = "full" if plan.parent.version else "scratch"
    return Changes(mode, reason, [], {}, set(), set(), "", needs_export=True)


def changes_from_snapshot(plan: Plan, path: Path, reason: str, *,
                          prompt_name: str = PROMPT_NAME) -> Changes:
    """The changes a full export shows (``path``: a downloaded snapshot): every task's state,
    the parent's tasks that are gone, and the tasks read again (all of them on a scratch
    build)."""
    with path.open("rb") as fp:
        states = {int(t["id"]): task_state(t, prompt_name) for t in iter_json_array(fp)
                  if isinstance(t, dict)}
    deleted = set(plan.parent.tasks) - set(states)
    reread = _reread(plan, states, deleted) if plan.parent.version else set(states)
    with path.open("rb") as fp:
        tasks = [t for t in iter_json_array(fp)
                 if not isinstance(t, dict) or int(t.get("id") or 0) in reread]
    mode: BuildMode = "scratch" if not plan.parent.version else "full"
    return Changes(mode, reason, tasks, states, deleted, reread, "")


def carried_exclusions(plan: Plan, changes: Changes) -> list[Exclusion]:
    """The parent's exclusions of tasks this build did not read again."""
    gone = changes.reread | changes.deleted
    return [e for e in plan.parent.exclusions if e.get("task_id") not in gone]


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
read_changes_task = io_task(name="read-changes", retries=0)(read_changes)
changes_from_snapshot_task = compute_task(name="changes-from-snapshot")(changes_from_snapshot)
