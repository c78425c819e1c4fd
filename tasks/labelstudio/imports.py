"""Bulk import of prompt tasks into Label Studio, exactly once.

The SDK retries a POST on 5xx and connection errors by default; for an import that would
create the same tasks twice, so every import here is sent with ``max_retries=0``. When a batch
fails with an unknown outcome (timeout, dropped connection, 5xx), the next attempt first waits
for the server to settle and asks the project which tasks of that batch landed (every task
carries ``data.ingest_batch``), then sends only the rest.
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

from sftflow.tasks._prefect import io_task
from sftflow.tasks.polling import Backoff, wait_until

#: Label Studio refuses these for the request as a whole (bad task, body too large).
_REJECTED = (400, 413, 422)


class ImportOutcomeUnknown(Exception):
    """A batch may or may not have landed; the retry reconciles before sending again.

    Transient for ``is_transient`` (it carries no HTTP status), so ``import_batch`` is retried.
    """


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


def wait_settled(
    count: Callable[[], int],
    settle_s: float,
    deadline_s: float = 60,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Wait until a count (the project's tasks) stops moving (a request we gave up on may still
    be running on the server): after ``settle_s``, read ``count()`` every 0.5, 1, 2, 4, 4... s
    until two reads agree or ``deadline_s`` has passed. Returns the last count read."""
    counts: list[int] = []

    def unchanged() -> bool:
        counts.append(count())
        return len(counts) > 1 and counts[-1] == counts[-2]

    sleep(settle_s)
    wait_until(unchanged, timeout_s=deadline_s, backoff=Backoff(0.5, 4.0, jitter=0.0), sleep=sleep)
    return counts[-1]


def _post(client: LabelStudio, project_id: int, tasks: list[dict[str, Any]], timeout_s: float | None) -> int:
    options: dict[str, Any] = {"max_retries": 0}
    if timeout_s is not None:
        options["timeout_in_seconds"] = timeout_s
    resp = client.projects.import_tasks(
        id=project_id, request=[{"data": t} for t in tasks], request_options=options
    )
    return int(resp.task_count or 0)


def send_tasks(
    client: LabelStudio, project_id: int, tasks: list[dict[str, Any]], timeout_s: float | None = None
) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]], int]:
    """POST tasks once each. A request Label Studio refuses as a whole is split in halves until
    the refused tasks are isolated. Returns (landed tasks, (refused task, reason), requests).

    Unknown outcomes raise ImportOutcomeUnknown; nothing here retries.
    """
    landed: list[dict[str, Any]] = []
    refused: list[tuple[dict[str, Any], str]] = []
    requests = 0
    stack = [tasks] if tasks else []
    while stack:
        part = stack.pop()
        requests += 1
        try:
            _post(client, project_id, part, timeout_s)
            landed.extend(part)
        except ApiError as err:
            if err.status_code in _REJECTED:
                if len(part) == 1:
                    reason = f"rejected_by_labelstudio: {err.status_code} {str(err.body)[:300]}"
                    refused.append((part[0], reason))
                else:
                    mid = len(part) // 2
                    stack.extend([part[mid:], part[:mid]])
                continue
            raise ImportOutcomeUnknown(f"Label Studio answered {err.status_code}: "
                                       f"{str(err.body)[:300]}") from err
        except httpx.HTTPError as err:  # timeouts, refused or dropped connections
            raise ImportOutcomeUnknown(f"{type(err).__name__}: {err}") from err
    return landed, refused, requests


@io_task(name="import-batch")
def import_batch(
    client: LabelStudio,
    project_id: int,
    batch: str,
    tasks: list[dict[str, Any]],
    *,
    timeout_s: float | None = None,
    settle_s: float = 2.0,
    reconcile_first: bool = False,
) -> BatchResult:
    """Import one batch of task data dicts (each with ``prompt_id`` and ``ingest_batch``).

    On a retry (Prefect's, or ``reconcile_first``) the batch is reconciled first: tasks of this
    batch already in the project are not sent again.
    """
    from prefect.runtime import task_run

    result = BatchResult(batch)
    todo = tasks
    if reconcile_first or (task_run.run_count or 0) > 1:
        wait_settled(lambda: task_count(client, project_id), settle_s)
        there = batch_prompt_ids(client, project_id, batch)
        todo = [t for t in tasks if t["prompt_id"] not in there]
        result.landed = [t["prompt_id"] for t in tasks if t["prompt_id"] in there]
        result.reconciled = len(result.landed)
    landed, refused, result.requests = send_tasks(client, project_id, todo, timeout_s)
    result.landed.extend(t["prompt_id"] for t in landed)
    result.rejected = refused
    return result


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
