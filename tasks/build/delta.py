"""The incremental export: the tasks changed since a watermark, and the proof that the list is
complete.

Label Studio moves a task's ``updated_at`` whenever one of its annotations is created, updated
or deleted (checked on 1.23), so the Data Manager filter ``tasks:updated_at > watermark``
returns every task whose annotations changed, with its annotations (``GET /api/tasks``,
``fields=all``), in pages ordered by id. Each page announces the ``total`` of the listing: a
listing is complete only when it holds that many distinct tasks. A page that fails, answers
anything but 200 (a 404 included: it is not "no more pages"), or comes back empty before the
total is in leaves the listing *unproven* (``Delta.unproven`` says why), and the build takes a
full export instead. A page shorter than asked is not the end either: a server or gateway that
caps the page size is paged on until the total is in.

Deleted tasks do not appear in any list: they show in the project counters. ``reconcile``
checks the counters against the parent version's task index plus the delta; when they
disagree, the build names the deleted tasks by counting id ranges (or listing every id), and
when that does not reconcile either, it falls back to a full export snapshot.

The watermark is taken from Label Studio's own data clock: the latest ``updated_at`` on the
listing's first page (``next_watermark``; the pages are separate queries, so only the first
is surely older than the whole reading), less an overlap, and never earlier than the
parent's. Neither the builder's clock nor a ``Date`` header (which a gateway stamps with its
own clock) enters it, so no clock skew can put an edit behind it. The overlap covers a save
whose ``updated_at`` was taken before the reading and committed after it; tasks seen again in
the overlap are recognised by their unchanged ``updated_at`` and cost nothing.

``task_state`` is the one fingerprint of a task's annotations, computed the same way from a
snapshot export and from the tasks API, so a full build and an incremental build agree on
what changed.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sftflow.core.errors import SftflowError
from sftflow.core.hashing import canonical_json, sha256_hex
from sftflow.tasks.adapters.labelstudio import PROMPT_NAME
from sftflow.tasks.runtime.declare import io_task
from sftflow.tasks.runtime.polling import Backoff, is_transient, retry

#: Seconds the next watermark overlaps the latest ``updated_at`` read: an annotation saved in
#: a transaction that commits after the reading (milliseconds in practice). Tasks created or
#: deleted behind the watermark show in the counters, which ``reconcile`` checks whatever the
#: overlap.
OVERLAP_S = 10.0
_DM_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # the only format the Data Manager datetime filter parses


def ls_time(value: Any) -> str:
    """A Label Studio timestamp in one canonical form (UTC, microseconds, ``Z``), whichever
    serializer wrote it; "" for none. Snapshots and the tasks API format times differently."""
    if not value:
        return ""
    try:
        dt = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime(_DM_TIME)


@dataclass(frozen=True)
class TaskState:
    """What the next build compares to find a changed task."""

    task_id: int
    state: str  # 16 hex: the prompt and every annotation's (id, updated_at, cancelled, gt)
    n_annotations: int  # not cancelled (Label Studio's total_annotations_number counts these)
    n_cancelled: int  # skipped_annotations_number
    updated_at: str = ""  # the task's own time (ls_time): unchanged means nothing to read


def task_state(task: Mapping[str, Any], prompt_name: str = PROMPT_NAME) -> TaskState:
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    anns = [a for a in (task.get("annotations") or []) if isinstance(a, dict)]
    marks = sorted(
        (int(a.get("id") or 0), ls_time(a.get("updated_at") or a.get("created_at")),
         bool(a.get("was_cancelled")), bool(a.get("ground_truth")))
        for a in anns)
    cancelled = sum(1 for a in anns if a.get("was_cancelled"))
    return TaskState(
        task_id=int(task.get("id") or 0),
        state=sha256_hex(canonical_json([data.get(prompt_name), marks]))[:16],
        n_annotations=len(anns) - cancelled,
        n_cancelled=cancelled,
        updated_at=ls_time(task.get("updated_at")),
    )


@dataclass
class Delta:
    """Tasks read from the tasks API, and whether the reading is proven complete."""

    tasks: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    pages: int = 0
    total: int = 0  # the tasks the listing announced (the last page's ``total``)
    unproven: str = ""  # why the reading is not proven complete ("" when it is)
    #: the latest ``updated_at`` on the first page (``ls_time``; "" for none), Label Studio's
    #: clock: what the reading surely saw. Later pages are later queries: an edit to a task
    #: of an earlier page may land between them, behind a time a later page shows.
    latest: str = ""


def _get(client: Any, params: dict[str, Any], timeout_s: float, path: str = "api/tasks/") -> Any:
    """One GET request (the tasks API unless ``path`` says otherwise), transient failures
    retried; any answer below 500 is returned as it is, for the caller to judge."""
    def call() -> Any:
        resp = client._client_wrapper.httpx_client.request(
            path, method="GET", params=params,
            request_options={"timeout_in_seconds": timeout_s, "max_retries": 0})
        if resp.status_code >= 500:
            raise ConnectionError(f"Label Studio answered {resp.status_code} to GET /{path}")
        return resp

    return retry(call, attempts=4, backoff=Backoff(0.5, 8.0), retry_if=is_transient)


def _ids_filter(ids: Sequence[int]) -> str:
    items = [{"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": i}
             for i in ids]
    return json.dumps({"filters": {"conjunction": "or", "items": items}})


def _filters(updated_after: str) -> str:
    items = [{"filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime",
              "value": updated_after}]
    return json.dumps({"filters": {"conjunction": "and", "items": items}})


def _page(client: Any, params: dict[str, Any], timeout_s: float) -> tuple[list, int] | str:
    """One page's tasks and the listing's announced ``total``, or why the page is no proof."""
    try:
        resp = _get(client, params, timeout_s)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the listing is not proven
        return f"page {params['page']} failed: {type(exc).__name__}: {exc}"
    if resp.status_code != 200:
        return f"page {params['page']} answered {resp.status_code}"
    try:
        body = resp.json()
        tasks, total = body["tasks"], body["total"]
    except (ValueError, KeyError, TypeError):
        return f"page {params['page']} is not a tasks listing"
    if not isinstance(tasks, list) or not isinstance(total, int):
        return f"page {params['page']} is not a tasks listing"
    return tasks, total


def _pages(client: Any, project_id: int, base: dict[str, Any], page_size: int,
           timeout_s: float, out: Delta) -> Iterable[list[dict[str, Any]]]:
    """The pages of one listing, until it holds the ``total`` the server announces (the last
    page's: a task updated during the reading joins the listing, pages ordered by id shift
    right, and nothing is skipped). Anything else sets ``out.unproven`` and stops: a failed,
    non-200 (404 included) or empty page before the total is in, or more pages than the
    total can fill."""
    seen: set[int] = set()
    for page in itertools.count(1):
        got = _page(client, {**base, "project": project_id, "page": page,
                             "page_size": page_size}, timeout_s)
        out.requests += 1
        if isinstance(got, str):
            out.unproven = f"{got} with {len(seen)} of {out.total or '?'} tasks read"
            return
        tasks, out.total = got
        out.pages += 1
        if out.pages == 1:
            out.latest = max((ls_time(t.get("updated_at")) for t in tasks), default="")
        fresh = [t for t in tasks if int(t["id"]) not in seen]
        seen.update(int(t["id"]) for t in fresh)
        yield fresh
        if len(seen) >= out.total:
            return
        if not tasks or page > 2 * out.total + 10:
            out.unproven = (f"page {page} brought {len(tasks)} tasks with {len(seen)} of "
                            f"{out.total} read")
            return


def fetch_tasks(client: Any, project_id: int, *, updated_after: str,
                page_size: int | None = None, timeout_s: float = 120.0,
                light: bool = False) -> Delta:
    """Tasks of the project updated after ``updated_after`` (``ls_time`` form), each with its
    annotations; ``light``: only each task's id and ``updated_at``, 5000 a page (the tasks API
    serialises every task whole whatever it is asked to include: about 0.5 ms a task light,
    5 ms with annotations, plus about 0.1 s a request). ``unproven`` says why the listing is
    not complete (see ``_pages``)."""
    page_size = page_size or (5000 if light else 500)
    out = Delta()
    what = ({"fields": "task_only", "include": "id,updated_at"} if light
            else {"fields": "all"})
    base = {**what, "query": _filters(updated_after)}
    for tasks in _pages(client, project_id, base, page_size, timeout_s, out):
        out.tasks += tasks
    return out


#: Task ids per request of ``export_tasks``: Django refuses a query string of over 1,000 fields.
EXPORT_IDS = 500


def export_tasks(client: Any, project_id: int, ids: Sequence[int], *,
                 timeout_s: float = 120.0) -> Delta:
    """The tasks with the given ``ids``, whole, in the shape of a snapshot export (the same
    serializer), through Label Studio's direct export (``GET /api/projects/{id}/export`` with
    ``ids[]``): about 3 ms a task at 55k tasks, against about 7 ms through the tasks API
    (measured on 1.23). That export lists a task's predictions by id only, so a task with an
    annotation made from a draft is read again through the tasks API, predictions whole
    (the build measures each draft's edits against its text). ``unproven`` says why the answer is not complete: a request that
    failed or did not answer a list, or a task asked for that did not come back. No ids, no
    request: the endpoint given none exports the whole project."""
    out = Delta()
    wanted = sorted({int(i) for i in ids})
    path = f"api/projects/{int(project_id)}/export"
    for k in range(0, len(wanted), EXPORT_IDS):
        chunk = wanted[k:k + EXPORT_IDS]
        out.requests += 1
        try:
            resp = _get(client, {"exportType": "JSON", "download_all_tasks": "true",
                                 "ids[]": chunk}, timeout_s, path)
            body = resp.json() if resp.status_code == 200 else None
        except Exception as exc:  # noqa: BLE001 - whatever failed, the answer is not whole
            out.unproven = f"exporting {len(chunk)} tasks failed: {type(exc).__name__}: {exc}"
            return out
        if not isinstance(body, list) or not all(isinstance(t, dict) for t in body):
            why = (f"answered {resp.status_code}" if resp.status_code != 200
                   else "answered no task list")
            out.unproven = f"the export of {len(chunk)} tasks {why}"
            return out
        out.pages += 1
        out.tasks += body
    out.total = len(out.tasks)
    missing = set(wanted) - {int(t.get("id") or 0) for t in out.tasks}
    if missing:
        out.unproven = f"{len(missing)} of {len(wanted)} tasks asked for did not come back"
        return out
    drafted = [int(t["id"]) for t in out.tasks if _drafted(t)]
    if drafted:  # the export lists predictions by id: these need theirs whole
        whole = _tasks_by_id(client, project_id, drafted, timeout_s, out)
        out.tasks = [whole.get(int(t["id"]), t) for t in out.tasks]
    return out


def _drafted(task: Mapping[str, Any]) -> bool:
    """An annotation of the task started from a prediction (a draft)."""
    return any(isinstance(a, dict) and a.get("parent_prediction")
               for a in task.get("annotations") or [])


def _tasks_by_id(client: Any, project_id: int, ids: Sequence[int], timeout_s: float,
                 out: Delta) -> dict[int, dict[str, Any]]:
    """The given tasks through the tasks API (``fields=all``: predictions whole, which the
    direct export gives as ids only), 100 ids a query; ``out.unproven`` set when one is missing
    or a listing is not proven."""
    got: dict[int, dict[str, Any]] = {}
    for k in range(0, len(ids), 100):
        sub = Delta()
        base = {"fields": "all", "query": _ids_filter(ids[k:k + 100])}
        for tasks in _pages(client, project_id, base, 500, timeout_s, sub):
            got.update({int(t["id"]): t for t in tasks})
        out.requests += sub.requests
        if sub.unproven:
            out.unproven = f"reading {len(ids)} drafted tasks whole: {sub.unproven}"
            return got
    if missing := set(ids) - set(got):
        out.unproven = f"{len(missing)} of {len(ids)} drafted tasks did not come back whole"
    return got


def list_task_ids(client: Any, project_id: int, *, page_size: int = 10_000,
                  timeout_s: float = 120.0) -> set[int] | None:
    """Every task id of the project (one light request per ``page_size`` tasks); None when
    the listing is not proven complete."""
    out = Delta()
    ids: set[int] = set()
    base = {"fields": "task_only", "include": "id"}
    for tasks in _pages(client, project_id, base, page_size, timeout_s, out):
        ids.update(int(t["id"]) for t in tasks)
    return None if out.unproven else ids


def _id_range(lo: int, hi: int) -> str:
    return json.dumps({"filters": {"conjunction": "and", "items": [
        {"filter": "filter:tasks:id", "operator": "greater_or_equal", "type": "Number",
         "value": lo},
        {"filter": "filter:tasks:id", "operator": "less", "type": "Number", "value": hi}]}})


def _count_in(client: Any, project_id: int, lo: int, hi: int, timeout_s: float) -> int | None:
    """Tasks of the project with ``lo <= id < hi`` (one count query, no rows); None when the
    server gives no count (a failed or non-200 answer is no count, never zero)."""
    got = _page(client, {"project": project_id, "fields": "task_only", "include": "id",
                         "page_size": 1, "page": 1, "query": _id_range(lo, hi)}, timeout_s)
    return None if isinstance(got, str) else got[1]


def _ids_in(client: Any, project_id: int, lo: int, hi: int, timeout_s: float) -> set[int] | None:
    """The ids of the project's tasks with ``lo <= id < hi`` (a light listing, proven
    complete against its total); None when it is not."""
    out = Delta()
    base = {"fields": "task_only", "include": "id", "query": _id_range(lo, hi)}
    ids = {int(t["id"]) for page in _pages(client, project_id, base, 1000, timeout_s, out)
           for t in page}
    return None if out.unproven else ids


#: A range holding at most this many expected ids is listed rather than bisected further: a
#: count costs about 0.1 s at 55k tasks and a light listing about 0.1 s plus 0.5 ms a task,
#: so listing 512 ids costs what 3-4 counts do and saves the 9 that halving them would take.
LIST_BELOW = 512


def find_missing(expected: Iterable[int], count: Callable[[int, int], int | None], *,
                 listing: Callable[[int, int], set[int] | None] | None = None,
                 list_below: int = LIST_BELOW, max_requests: int = 400,
                 ) -> tuple[set[int] | None, int]:
    """Which ``expected`` ids are gone, given ``count(lo, hi)``: how many ids in ``[lo, hi)``
    exist (None: no answer). Bisects the ranges that fall short, counting only the left half of
    each split (the right half's count is the rest of the parent's), so one missing id among n
    costs about log2(n) + 1 counts; with ``listing(lo, hi)`` (the ids that exist there, None:
    no answer), a short range holding at most ``list_below`` expected ids is listed instead.
    Returns (the missing ids, or None when a range holds more than expected, a count or a
    listing gets no answer or disagrees, or ``max_requests`` would be exceeded; the requests
    made)."""
    ids = sorted(set(expected))
    gone: set[int] = set()
    made = [0]

    def asked(ask: Callable[[int, int], Any], lo: int, hi: int) -> Any:
        if made[0] >= max_requests:
            return None
        made[0] += 1
        return ask(lo, hi)

    def listed(i: int, j: int, lo: int, hi: int, have: int) -> bool:
        present = asked(listing, lo, hi)  # type: ignore[arg-type]
        here = set(ids[i:j])
        if present is None or not present <= here or len(present) != have:
            return False  # no answer, a task the change list did not name, or it moved
        gone.update(here - present)
        return True

    def walk(i: int, j: int, lo: int, hi: int, have: int) -> bool:  # ids[i:j] lie in [lo, hi)
        if have > j - i:
            return False  # a task the change list did not name
        if have == j - i:
            return True
        if have == 0:
            gone.update(ids[i:j])
            return True
        if listing is not None and j - i <= list_below:
            return listed(i, j, lo, hi, have)
        m = (i + j) // 2
        left = asked(count, lo, ids[m])
        return left is not None and walk(i, m, lo, ids[m], left) \
            and walk(m, j, ids[m], hi, have - left)

    if not ids:
        return gone, 0
    total = asked(count, ids[0], ids[-1] + 1)
    ok = total is not None and walk(0, len(ids), ids[0], ids[-1] + 1, total)
    return (gone if ok else None), made[0]


def find_deleted(client: Any, project_id: int, expected: Iterable[int], *,
                 max_requests: int = 400, timeout_s: float = 60.0) -> set[int] | None:
    """Which of the ``expected`` task ids are gone (``find_missing`` over count queries of the
    project, each ~0.1 s at 55k tasks, and light listings of short ranges; listing every id
    costs ~15 s there). None when more than ``max_requests`` queries would be needed, or a
    range holds more tasks than expected (something the change list missed)."""
    gone, _ = find_missing(
        expected, lambda lo, hi: _count_in(client, project_id, lo, hi, timeout_s),
        listing=lambda lo, hi: _ids_in(client, project_id, lo, hi, timeout_s),
        max_requests=max_requests)
    return gone


def watermark(data_time: str, overlap_s: float = OVERLAP_S) -> str:
    """The watermark a reading that saw Label Studio up to ``data_time`` (``ls_time`` form, on
    Label Studio's clock) leaves the next build: that time less the overlap."""
    if not data_time:
        raise SftflowError("no Label Studio time to take a watermark from")
    dt = datetime.strptime(ls_time(data_time), _DM_TIME).replace(tzinfo=UTC)
    return (dt - timedelta(seconds=overlap_s)).strftime(_DM_TIME)


def next_watermark(previous: str, times: Iterable[str], overlap_s: float = OVERLAP_S) -> str:
    """The next build's watermark: the latest of ``times`` (``updated_at`` values the reading
    surely saw whole, Label Studio's own clock) less the overlap, never earlier than
    ``previous`` (the parent's; a reading that returned nothing keeps it). "" when there is
    neither."""
    latest = max((ls_time(t) for t in times if t), default="")
    mark = watermark(latest, overlap_s) if latest else ""
    return max(ls_time(previous), mark)


def reconcile(parent: Mapping[int, TaskState], changed: Mapping[int, TaskState],
              deleted: Iterable[int], counters: Mapping[str, int]) -> str | None:
    """None when the project's counters equal the parent's task index with the changes
    applied (``changed`` holds the current state of every changed or new task, ``deleted``
    the ids gone); otherwise why not, in words."""
    deleted = {d for d in deleted if d in parent}
    new = sum(1 for t in changed if t not in parent)
    tasks = len(parent) - len(deleted) + new
    ann = sum(s.n_annotations for t, s in parent.items() if t not in changed and t not in deleted)
    ann += sum(s.n_annotations for s in changed.values())
    skipped = sum(s.n_cancelled for t, s in parent.items() if t not in changed and t not in deleted)
    skipped += sum(s.n_cancelled for s in changed.values())
    problems = [
        f"{name}: Label Studio says {counters.get(key, 0)}, the parent plus the delta gives {mine}"
        for name, key, mine in (("tasks", "task_number", tasks),
                                ("annotations", "total_annotations_number", ann),
                                ("skipped annotations", "skipped_annotations_number", skipped))
        if int(counters.get(key, 0) or 0) != mine
    ]
    return "; ".join(problems) or None


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
fetch_tasks_task = io_task(name="list-changed-tasks")(fetch_tasks)
export_tasks_task = io_task(name="export-changed-tasks")(export_tasks)
list_task_ids_task = io_task(name="list-task-ids")(list_task_ids)
find_deleted_task = io_task(name="find-deleted-tasks")(find_deleted)
