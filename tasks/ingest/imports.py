"""Bulk import of prompt tasks into Label Studio, exactly once.

The SDK retries a POST on 5xx and connection errors by default; for an import that would
create the same tasks twice, so every import here is sent with ``max_retries=0``.

An import request whose outcome is unknown (client timeout, dropped connection, a gateway's
502/503/504) may still be running on the server, and Label Studio creates a request's tasks in
one transaction: until it commits, nothing shows. So a request in doubt is never resent until
it has certainly ended: ``await_outcome`` looks its tasks up (every task carries
``data.ingest_batch``) until either all of them are there (it landed) or ``doubt_s`` seconds
have passed since it was sent (the longest a request can live on the server: past that it
either committed, and its tasks show, or never will). Only then is the rest sent again.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from sftflow.tasks.runtime.declare import io_task
from sftflow.tasks.runtime.polling import Backoff, wait_until

#: Label Studio refuses these for the request as a whole (bad task, body too large).
_REJECTED = (400, 413, 422)
#: How often a single task answered 500 is sent before it is refused.
_SINGLE_500_TRIES = 2


#: Import requests in doubt one batch may go through before ``import_batch`` gives up.
_MAX_DOUBTS = 3


class ImportOutcomeUnknown(Exception):
    """An import request may or may not have landed. ``send_tasks`` says how far it got: tasks
    landed and refused before, the request in doubt (when it was sent), the parts not sent yet.

    Transient for ``is_transient`` (it carries no HTTP status), so ``import_batch`` is retried
    (and then waits out the doubt before it sends anything).
    """

    def __init__(self, message: str, *, in_doubt: list[dict[str, Any]] | None = None,
                 sent_at: float = 0.0, landed: list[dict[str, Any]] | None = None,
                 refused: list[tuple[dict[str, Any], str]] | None = None,
                 unsent: list[dict[str, Any]] | None = None, requests: int = 0):
        super().__init__(message)
        self.in_doubt, self.sent_at = in_doubt or [], sent_at
        self.landed, self.refused, self.unsent = landed or [], refused or [], unsent or []
        self.requests = requests


@dataclass
class BatchResult:
    batch: str
    landed: list[str] = field(default_factory=list)  # prompt_ids now in the project from it
    reconciled: int = 0  # of those, found already there from an earlier attempt
    rejected: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # (task, reason)
    requests: int = 0


def _ids_filter(key: str, value: str) -> str:
    return json.dumps({"filters": {"conjunction": "and", "items": [
        {"filter": f"filter:tasks:data.{key}", "operator": "equal", "type": "String", "value": value}
    ]}})


def iter_project_tasks(
    client: LabelStudio, project_id: int, *, batch: str | None = None, page_size: int = 5000
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(task id, task data)`` for every task of the project (or of one ingest batch)."""
    query = _ids_filter("ingest_batch", batch) if batch else None
    pager = client.tasks.list(project=project_id, include="id,data", page_size=page_size,
                              query=query, fields="task_only")
    for task in pager:
        yield int(task.id), dict(task.data or {})


def batch_prompt_ids(client: LabelStudio, project_id: int, batch: str) -> Counter[str]:
    """How many tasks of ``batch`` hold each prompt_id (more than 1 would be a duplicate)."""
    return Counter(d.get("prompt_id") for _, d in iter_project_tasks(client, project_id, batch=batch))


def task_count(client: LabelStudio, project_id: int) -> int:
    return int(client.projects.get(id=project_id).task_number or 0)


def await_outcome(
    client: LabelStudio,
    project_id: int,
    batch: str,
    landed: Callable[[Counter[str]], bool],
    *,
    sent_at: float,
    doubt_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Counter[str]:
    """The prompt_ids of ``batch`` in the project once a request of it in doubt (sent at
    ``clock()`` time ``sent_at``) has certainly ended: as soon as ``landed(prompt_ids)`` says
    all its tasks are there, or else once ``doubt_s`` has passed since ``sent_at``. Polls with
    backoff meanwhile."""
    deadline = sent_at + doubt_s

    def ended() -> Counter[str] | None:
        there = batch_prompt_ids(client, project_id, batch)
        return there if landed(there) or clock() >= deadline else None

    found = wait_until(ended, timeout_s=max(0.0, deadline - clock()),
                       backoff=Backoff(0.5, 5.0), sleep=sleep)
    return found if found is not None else batch_prompt_ids(client, project_id, batch)


def _post(client: LabelStudio, project_id: int, tasks: list[dict[str, Any]], timeout_s: float | None) -> int:
    options: dict[str, Any] = {"max_retries": 0}
    if timeout_s is not None:
        options["timeout_in_seconds"] = timeout_s
    resp = client.projects.import_tasks(
        id=project_id, request=[{"data": t} for t in tasks], request_options=options
    )
    return int(resp.task_count or 0)


def send_tasks(
    client: LabelStudio, project_id: int, tasks: list[dict[str, Any]], timeout_s: float | None = None,
    *, sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]], int]:
    """POST tasks once each. A request Label Studio refuses as a whole (400/413/422), or fails
    with its own 500, is split in halves until the refused tasks are isolated; a single task
    answered 500 is tried once more before it is refused. Returns (landed tasks, (refused
    task, reason), requests).

    A 500 is Label Studio's own answer: the request has ended and its transaction (the whole
    import is one) was rolled back, so nothing of it landed (e.g. U+0000 on PostgreSQL).
    Gateways answer 502/503/504: those and transport errors are unknown outcomes and raise
    ImportOutcomeUnknown (saying how far the sending got); nothing here resends them.
    """
    landed: list[dict[str, Any]] = []
    refused: list[tuple[dict[str, Any], str]] = []
    requests = 0
    stack: list[tuple[list[dict[str, Any]], int]] = [(tasks, 0)] if tasks else []
    while stack:
        part, failures = stack.pop()
        requests += 1
        sent_at = time.monotonic()
        try:
            _post(client, project_id, part, timeout_s)
            landed.extend(part)
            continue
        except ApiError as err:
            if err.status_code in (*_REJECTED, 500):
                if len(part) > 1:
                    mid = len(part) // 2
                    stack.extend([(part[mid:], 0), (part[:mid], 0)])
                elif err.status_code == 500 and failures < _SINGLE_500_TRIES - 1:
                    sleep(1.0)  # a passing server error (e.g. a locked database): once more
                    stack.append((part, failures + 1))
                else:
                    why = f"rejected_by_labelstudio: {err.status_code} {str(err.body)[:300]}"
                    refused.append((part[0], why))
                continue
            doubt = f"Label Studio answered {err.status_code}: {str(err.body)[:300]}"
            cause: Exception = err
        except httpx.HTTPError as err:  # timeouts, refused or dropped connections
            doubt, cause = f"{type(err).__name__}: {err}", err
        raise ImportOutcomeUnknown(doubt, in_doubt=part, sent_at=sent_at, landed=landed,
                                   refused=refused, requests=requests,
                                   unsent=[t for p, _ in stack for t in p]) from cause
    return landed, refused, requests


def import_batch(
    client: LabelStudio,
    project_id: int,
    batch: str,
    tasks: list[dict[str, Any]],
    *,
    timeout_s: float | None = None,
    doubt_s: float = 300.0,
    reconcile_first: bool = False,
) -> BatchResult:
    """Import one batch of task data dicts (each with ``prompt_id`` and ``ingest_batch``),
    each task exactly once.

    A request in doubt is resolved by ``await_outcome`` before anything is sent again (at most
    ``_MAX_DOUBTS`` times; then ImportOutcomeUnknown). On a retry (Prefect's, or
    ``reconcile_first``: a batch an interrupted attempt may have sent) the batch is first
    looked up the same way, its last request taken as sent just now.
    """
    from prefect.runtime import task_run

    result = BatchResult(batch)
    todo = tasks
    if reconcile_first or (task_run.run_count or 0) > 1:
        todo = _take_landed(result, tasks, await_outcome(
            client, project_id, batch, all_of(tasks), sent_at=time.monotonic(), doubt_s=doubt_s))
    for _ in range(_MAX_DOUBTS):
        try:
            landed, refused, requests = send_tasks(client, project_id, todo, timeout_s)
        except ImportOutcomeUnknown as doubt:
            result.landed.extend(t["prompt_id"] for t in doubt.landed)
            result.rejected.extend(doubt.refused)
            result.requests += doubt.requests
            there = await_outcome(client, project_id, batch, all_of(doubt.in_doubt),
                                  sent_at=doubt.sent_at, doubt_s=doubt_s)
            todo = _take_landed(result, doubt.in_doubt, there) + doubt.unsent
            continue
        result.landed.extend(t["prompt_id"] for t in landed)
        result.rejected.extend(refused)
        result.requests += requests
        return result
    raise ImportOutcomeUnknown(f"batch {batch}: {_MAX_DOUBTS} import requests in doubt in a row")


def all_of(tasks: list[dict[str, Any]]) -> Callable[[Counter[str]], bool]:
    """For ``await_outcome``: whether every one of ``tasks`` is among the prompt_ids found."""
    wanted = {t["prompt_id"] for t in tasks}
    return lambda there: wanted <= there.keys()


def _take_landed(result: BatchResult, tasks: list[dict[str, Any]],
                 there: Counter[str]) -> list[dict[str, Any]]:
    """Count the tasks found in the project as landed (reconciled); the others are to send."""
    found = [t["prompt_id"] for t in tasks if t["prompt_id"] in there]
    result.landed.extend(found)
    result.reconciled += len(found)
    return [t for t in tasks if t["prompt_id"] not in there]


@dataclass
class ProjectScan:
    """What a full read of the project's tasks found."""

    ids: set[str]  # distinct prompt_ids present
    task_number: int
    without_id: int  # tasks with no prompt_id (imported by other means); id computed from prompt
    duplicates: list[int]  # ingest-created task ids holding an already present prompt_id


def scan_project(client: LabelStudio, project_id: int, prompt_id_of: Any) -> ProjectScan:
    """Read every task's data once and collect the prompt_ids present.

    Tasks created by other means get their id from ``data["prompt"]`` so the same prompt is
    not imported next to them. Later ingest-created copies of a present prompt_id are listed
    as ``duplicates`` (candidates for removal when unannotated).
    """
    ids: set[str] = set()
    dups: list[int] = []
    n = without = 0
    for task_id, data in sorted(iter_project_tasks(client, project_id)):
        n += 1
        pid = data.get("prompt_id")
        if not pid:
            text = data.get("prompt")
            if not isinstance(text, str):
                continue
            pid, without = prompt_id_of(text), without + 1
        if pid in ids and data.get("ingest_batch"):
            dups.append(task_id)
        ids.add(pid)
    return ProjectScan(ids, n, without, dups)


def remove_unannotated(client: LabelStudio, task_ids: list[int]) -> list[int]:
    """Delete those of ``task_ids`` that have no annotations; returns the ids deleted."""
    deleted = []
    for tid in task_ids:
        task = client.tasks.get(id=tid)
        if not (task.total_annotations or 0) and not (task.cancelled_annotations or 0):
            client.tasks.delete(id=tid)
            deleted.append(tid)
    return deleted


#: Read-only, so safe to retry as a whole.
scan_project_task = io_task(name="scan-project")(scan_project)


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
import_batch_task = io_task(name="import-batch")(import_batch)
