"""Which tasks a build reads again, and how it knows the list is complete.

``read_changes`` is the incremental export: the tasks updated since the parent's watermark
(a light listing proven complete against the total it announces, then only the changed tasks
whole, through Label Studio's direct export by id), reconciled against the project counters,
deleted tasks found by bisecting id counts.
Its ``reason`` is then the proof. When any of that cannot be proven (a failed, 404 or short
page, counters that do not reconcile or moved during the reading), it asks for a full export,
the reason naming the cause, and ``changes_from_snapshot`` reads the changes from the
downloaded snapshot instead. Either way the result is a ``Changes``: the tasks to parse, every state
seen, deletions, and the tasks whose parent rows leave.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.utilities.annotations import quote

from sftflow.tasks.adapters.labelstudio import PROMPT_NAME, project_counters
from sftflow.tasks.build.delta import (
    TaskState,
    export_tasks_task,
    fetch_tasks_task,
    find_deleted_task,
    list_task_ids_task,
    ls_time,
    next_watermark,
    reconcile,
    task_state,
)
from sftflow.tasks.build.export import iter_json_array
from sftflow.tasks.build.incremental import changed_tasks, orphan_tasks
from sftflow.tasks.build.plan import BuildMode, Plan
from sftflow.tasks.runtime.declare import compute_task, io_task
from sftflow.tasks.runtime.progress import PhaseTimer
from sftflow.tasks.versions.rows import Exclusion


@dataclass
class Changes:
    """The tasks a build reads again, and what it learnt about the project."""

    mode: BuildMode
    reason: str
    #: the tasks to parse (changed, new, orphaned), whole, when read through the API; a full
    #: export leaves it empty and names its ``snapshot`` instead (see ``iter_tasks``)
    tasks: list[dict[str, Any]]
    states: dict[int, TaskState]  # current states of those tasks (all tasks on a full export)
    deleted: set[int]
    reread: set[int]  # changed or deleted or orphaned: their parent rows leave
    watermark: str  # the next build's (``next_watermark``: Label Studio's clock, less the overlap)
    export: dict[str, Any] = field(default_factory=dict)  # snapshot id and time, requests
    needs_export: bool = False  # the change list is not proven: take a full export
    #: the project counters read before anything else (recorded with the version: the next
    #: build's baseline)
    counters: dict[str, int] = field(default_factory=dict)
    #: a full export: the downloaded snapshot, from which ``iter_tasks`` streams the tasks in
    #: ``reread`` (a scratch build of 300k tasks held them all whole: most of its 7 GB)
    snapshot: Path | None = None
    tasks_read: int | None = None  # how many ``iter_tasks`` yields (None: ``len(tasks)``)

    def iter_tasks(self) -> Iterator[Any]:
        """The tasks to parse, one at a time: ``tasks``, or those of the snapshot read again
        (and anything in it that is not a task object, which the parser counts as malformed).
        The snapshot must still be on disk."""
        if self.snapshot is None:
            yield from self.tasks
            return
        with self.snapshot.open("rb") as fp:
            for t in iter_json_array(fp):
                if not isinstance(t, dict) or int(t.get("id") or 0) in self.reread:
                    yield t

    def count_read(self) -> int:
        return len(self.tasks) if self.tasks_read is None else self.tasks_read


def _reread(plan: Plan, states: Mapping[int, TaskState], deleted: set[int]) -> set[int]:
    changed = changed_tasks(plan.parent.tasks, states, deleted)
    kept = {r["cluster_id"] for r in plan.parent.rows if r["task_id"] not in changed}
    return changed | orphan_tasks(plan.parent.tasks, changed, kept)


def _listing(ls: Any, project_id: int, plan: Plan, clock: PhaseTimer) -> tuple[Any, Any] | str:
    """The light listing of the tasks updated since the parent's watermark, then the tasks
    whose ``updated_at`` the parent did not record, whole; or why that reading is no proof."""
    since = plan.parent.source["watermark"]
    seen = fetch_tasks_task(ls, project_id, updated_after=since, light=True)
    clock.lap("list")
    if seen.unproven:
        return f"the listing of the tasks updated since {since} ({seen.unproven})"
    known = plan.parent.tasks
    stale = sorted(int(t["id"]) for t in seen.tasks if int(t["id"]) not in known
                   or not known[int(t["id"])].get("updated_at")
                   or known[int(t["id"])]["updated_at"] != ls_time(t.get("updated_at")))
    delta = export_tasks_task(ls, project_id, stale)
    clock.lap("fetch")
    if delta.unproven:
        return f"reading the {len(stale)} changed tasks whole ({delta.unproven})"
    return seen, delta


def _deleted(ls: Any, project_id: int, plan: Plan, states: Mapping[int, TaskState],
             counters: Mapping[str, int]) -> tuple[set[int], str | None]:
    """The deleted tasks, when the counters say some are gone: named by counting id ranges,
    else by listing every id; and what still does not reconcile (None: all of it does)."""
    expected = set(plan.parent.tasks) | set(states)
    found = find_deleted_task(ls, project_id, quote(expected))  # 55k ids: not walked
    if found is None:
        found = list_task_ids_task(ls, project_id)
        if found is None:
            return set(), "the project's task ids could not all be listed"
        found = expected - found
    return found, reconcile(plan.parent.states(), states, found, counters)


def _incremental(ls: Any, project_id: int, plan: Plan, prompt_name: str,
                 before: Mapping[str, int], clock: PhaseTimer) -> Changes | str:
    """The incremental export, proven; or why it is not (the build then takes a full one).
    ``before``: the counters read before the listing."""
    got = _listing(ls, project_id, plan, clock)
    if isinstance(got, str):
        return f"change list not proven: {got}"
    seen, delta = got
    now = project_counters(ls, project_id)
    clock.lap("counters")
    if now != before:
        return "change list not proven: the project changed during the reading"
    states = {int(t["id"]): task_state(t, prompt_name) for t in delta.tasks}
    deleted: set[int] = set()
    if why := reconcile(plan.parent.states(), states, deleted, now):
        deleted, why = _deleted(ls, project_id, plan, states, now)
        clock.lap("deleted")
    if why:
        return f"counters do not reconcile ({why})"
    reread = _reread(plan, states, deleted)
    orphans = sorted(reread - set(states) - deleted)
    extra = export_tasks_task(ls, project_id, orphans)
    clock.lap("fetch")
    if extra.unproven:
        return f"change list not proven: reading the orphaned tasks ({extra.unproven})"
    states.update({int(t["id"]): task_state(t, prompt_name) for t in extra.tasks})
    by_id = {int(t["id"]): t for t in delta.tasks + extra.tasks}
    since = plan.parent.source["watermark"]
    proof = (f"change list proven: the listing of the tasks updated since {since} holds all "
             f"{len(seen.tasks)} of {seen.total} ({seen.pages} pages), and the counters "
             f"reconcile ({now['task_number']} tasks, {now['total_annotations_number']} "
             f"annotations{f', {len(deleted)} deleted' if deleted else ''})")
    mark = next_watermark(since, [seen.latest])
    return Changes("incremental", proof, [by_id[t] for t in sorted(reread) if t in by_id],
                   states, deleted, reread, mark, counters=dict(before), export={
                       "requests": seen.requests + delta.requests + extra.requests,
                       "tasks_listed": len(seen.tasks), "tasks_fetched": len(delta.tasks),
                       "pages_listed": seen.pages, "seconds": clock.seconds(),
                       # the latest updated_at of every page (Label Studio's clock): when the
                       # reading's rows were read, to order builds (not a watermark: see delta)
                       "read_at": max((ls_time(t.get("updated_at")) for t in seen.tasks),
                                      default="")})


def read_changes(ls: Any, project_id: int, plan: Plan, *,
                 prompt_name: str = PROMPT_NAME) -> Changes:
    """The incremental export: tasks updated since the parent's watermark (a listing proven
    complete against the total it announces), checked against the project counters, deleted
    tasks found by counting id ranges when the counts say some are gone. The answer's
    ``reason`` is the proof; ``counters`` the project counters read first, whatever the mode.
    When the plan is not incremental, or any of it cannot be proven
    (a failed, 404 or short page, counters that do not reconcile or that moved during the
    reading), the answer asks for a full export (``needs_export``, the reason naming the
    cause), which the flow then takes and hands to :func:`changes_from_snapshot`."""
    reason = plan.reason
    clock = PhaseTimer()  # its laps show where an incremental export's seconds go
    before = project_counters(ls, project_id)
    clock.lap("counters")
    if plan.mode == "incremental":
        got = _incremental(ls, project_id, plan, prompt_name, before, clock)
        if isinstance(got, Changes):
            return got
        reason = got
    mode: BuildMode = "full" if plan.parent.version else "scratch"
    return Changes(mode, reason, [], {}, set(), set(), "", needs_export=True,
                   counters=before)


def changes_from_snapshot(plan: Plan, path: Path, reason: str, *,
                          prompt_name: str = PROMPT_NAME) -> Changes:
    """The changes a full export shows (``path``: a downloaded snapshot): every task's state,
    the parent's tasks that are gone, and the tasks read again (all of them on a scratch
    build), which ``Changes.iter_tasks`` then streams from the file. No watermark: the flow
    takes the snapshot's creation time (Label Studio's clock, before the snapshot was
    serialised) less the overlap."""
    states: dict[int, TaskState] = {}
    ids: list[int] = []  # in file order, repeats kept: what ``iter_tasks`` will yield
    malformed = 0
    with path.open("rb") as fp:
        for t in iter_json_array(fp):
            if isinstance(t, dict):
                tid = int(t["id"])
                states[tid] = task_state(t, prompt_name)
                ids.append(tid)
            else:
                malformed += 1
    deleted = set(plan.parent.tasks) - set(states)
    reread = _reread(plan, states, deleted) if plan.parent.version else set(states)
    mode: BuildMode = "scratch" if not plan.parent.version else "full"
    return Changes(mode, reason, [], states, deleted, reread, "", snapshot=path,
                   tasks_read=malformed + sum(1 for i in ids if i in reread))


def carried_exclusions(plan: Plan, changes: Changes) -> list[Exclusion]:
    """The parent's exclusions of tasks this build did not read again."""
    gone = changes.reread | changes.deleted
    return [e for e in plan.parent.exclusions if e.get("task_id") not in gone]


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
read_changes_task = io_task(name="read-changes", retries=0)(read_changes)
changes_from_snapshot_task = compute_task(name="changes-from-snapshot")(changes_from_snapshot)
