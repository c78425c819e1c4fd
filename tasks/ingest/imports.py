"""Bulk import of prompt tasks into Label Studio, exactly once.

The SDK retries a POST on 5xx and connection errors by default; for an import that would
create the same tasks twice, so every import here is sent with ``max_retries=0``.

An import whose outcome is unknown (any 5xx, a timeout, a lost answer) is reconciled, never
resent blind: its tasks are looked up in the project (every task carries
``data.ingest_batch``) before anything of it is sent again.

- A 500 is an answer from the server itself: the request has ended, but it may have committed
  its tasks before failing (an error after the commit). One look-up decides: what is there
  landed (counted as reconciled); only what is not is treated as refused (halved, see
  ``send_tasks``).
- A client timeout, a dropped connection or a gateway's 502/503/504 (any other 5xx) leaves a
  request that may still be running on the server, and Label Studio creates a request's tasks
  in one transaction: until it commits, nothing shows. So such a request is never resent until
  it has certainly ended: ``await_outcome`` looks its tasks up until either all of them are
  there (it landed) or ``doubt_s`` seconds have passed since it was sent (the longest a request
  can live on the server: past that it either committed, and its tasks show, or never will).
  Only then is the rest sent again.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from label_studio_sdk.core.api_error import ApiError

from sftflow.tasks.adapters.labelstudio import post_json
from sftflow.tasks.runtime.declare import io_task
from sftflow.tasks.runtime.polling import Backoff, wait_until

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

#: Label Studio refuses these for the request as a whole (bad task, body too large).
_REJECTED = (400, 413, 422)
#: Label Studio's own server error: the request has ended, committed or not (looked up).
_SERVER_ERROR = 500
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
                 unsent: list[dict[str, Any]] | None = None, requests: int = 0,
                 reconciled: int = 0):
        super().__init__(message)
        self.in_doubt, self.sent_at = in_doubt or [], sent_at
        self.landed, self.refused, self.unsent = landed or [], refused or [], unsent or []
        self.requests, self.reconciled = requests, reconciled


@dataclass
class Sent:
    """What ``send_tasks`` did: the tasks now in the project (``reconciled`` of them found
    there after a 500), the tasks refused with their reasons, the requests made."""

    landed: list[dict[str, Any]] = field(default_factory=list)
    refused: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    requests: int = 0
    reconciled: int = 0
    #: prompt_id -> task id of the tasks Label Studio created in answer to this call's requests
    #: (the import answers them in order); none for tasks found there after a 500 or a doubt
    task_ids: dict[str, int] = field(default_factory=dict)


@dataclass
class BatchResult:
    batch: str
    landed: list[str] = field(default_factory=list)  # prompt_ids now in the project from it
    reconciled: int = 0  # of those, found already there from an earlier attempt
    rejected: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # (task, reason)
    requests: int = 0
    task_ids: dict[str, int] = field(default_factory=dict)  # as ``Sent.task_ids``


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


def _post(client: LabelStudio, project_id: int, tasks: list[dict[str, Any]],
          timeout_s: float | None) -> dict[str, int]:
    """POST ``tasks`` (one request, no retry); the ids Label Studio gave them, by prompt_id
    (empty when the answer holds none, or not one per task)."""
    answer = post_json(client, f"api/projects/{project_id}/import", [{"data": t} for t in tasks],
                       params={"return_task_ids": "true"}, timeout_s=timeout_s)
    ids = answer.get("task_ids") if isinstance(answer, dict) else None  # the request's order
    if not isinstance(ids, list) or len(ids) != len(tasks):
        return {}
    return {str(t.get("prompt_id")): int(i) for t, i in zip(tasks, ids, strict=True)}


def committed_after_500(client: LabelStudio, project_id: int,
                        part: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The tasks of ``part`` found in the project after its request was answered 500 (one
    look-up of its batch: the request has ended, committed or not). None when the tasks carry
    no ``ingest_batch`` to look them up by (then the outcome stays unknown)."""
    batches = {t.get("ingest_batch") for t in part}
    if None in batches or len(batches) != 1:
        return None
    there = batch_prompt_ids(client, project_id, str(batches.pop()))
    return [t for t in part if t.get("prompt_id") in there]


def _look_up_after_500(client: LabelStudio, project_id: int,
                       part: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """``committed_after_500``, or None (the outcome stays unknown: awaited) when the look-up
    itself fails."""
    try:
        return committed_after_500(client, project_id, part)
    except (ApiError, httpx.HTTPError):
        return None


def _split(part: list[dict[str, Any]], failures: int, err: ApiError,
           stack: list[tuple[list[dict[str, Any]], int]],
           refused: list[tuple[dict[str, Any], str]], sleep: Callable[[float], None]) -> None:
    """A request refused as a whole: its halves go back on the stack; a single task answered
    500 is tried once more, then refused, as is a single task refused with 4xx."""
    if len(part) > 1:
        mid = len(part) // 2
        stack.extend([(part[mid:], 0), (part[:mid], 0)])
    elif err.status_code == _SERVER_ERROR and failures < _SINGLE_500_TRIES - 1:
        sleep(1.0)  # a passing server error (e.g. a locked database): once more
        stack.append((part, failures + 1))
    else:
        why = f"rejected_by_labelstudio: {err.status_code} {str(err.body)[:300]}"
        refused.append((part[0], why))


def send_tasks(
    client: LabelStudio, project_id: int, tasks: list[dict[str, Any]], timeout_s: float | None = None,
    *, sleep: Callable[[float], None] = time.sleep,
) -> Sent:
    """POST tasks once each. A request Label Studio refuses as a whole (400/413/422) is split
    in halves until the refused tasks are isolated; a single task answered 500 is tried once
    more before it is refused.

    A 500 is never taken as "nothing landed": Label Studio may answer it after its transaction
    committed. The request has ended, so its batch is looked up once (``committed_after_500``):
    what is there counts as landed (``reconciled``), and only the rest is split and sent again
    (a rolled-back 500, e.g. U+0000 on PostgreSQL, so isolates its task). Gateways answer
    502/503/504: those, other answers and transport errors are unknown outcomes and raise
    ImportOutcomeUnknown (saying how far the sending got); nothing here resends them.
    """
    sent = Sent()
    stack: list[tuple[list[dict[str, Any]], int]] = [(tasks, 0)] if tasks else []
    while stack:
        part, failures = stack.pop()
        sent.requests += 1
        sent_at = time.monotonic()
        try:
            sent.task_ids.update(_post(client, project_id, part, timeout_s))
            sent.landed.extend(part)
            continue
        except ApiError as err:
            found = (_look_up_after_500(client, project_id, part)
                     if err.status_code == _SERVER_ERROR else [])
            if found is not None and err.status_code in (*_REJECTED, _SERVER_ERROR):
                sent.landed.extend(found)
                sent.reconciled += len(found)
                there = {t.get("prompt_id") for t in found}
                rest = [t for t in part if t.get("prompt_id") not in there] if found else part
                if rest:
                    _split(rest, failures, err, stack, sent.refused, sleep)
                continue
            doubt = f"Label Studio answered {err.status_code}: {str(err.body)[:300]}"
            cause: Exception = err
        except httpx.HTTPError as err:  # timeouts, refused or dropped connections
            doubt, cause = f"{type(err).__name__}: {err}", err
        raise ImportOutcomeUnknown(doubt, in_doubt=part, sent_at=sent_at, landed=sent.landed,
                                   refused=sent.refused, requests=sent.requests,
                                   reconciled=sent.reconciled,
                                   unsent=[t for p, _ in stack for t in p]) from cause
    return sent


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

    A request answered 500 is looked up at once (``send_tasks``). A request in doubt is
    resolved by ``await_outcome`` before anything is sent again (at most ``_MAX_DOUBTS`` times;
    then ImportOutcomeUnknown). On a retry (Prefect's, or ``reconcile_first``: a batch an
    interrupted attempt may have sent) the batch is first looked up the same way, its last
    request taken as sent just now.
    """
    from prefect.runtime import task_run

    result = BatchResult(batch)
    todo = tasks
    if reconcile_first or (task_run.run_count or 0) > 1:
        todo = _take_landed(result, tasks, await_outcome(
            client, project_id, batch, all_of(tasks), sent_at=time.monotonic(), doubt_s=doubt_s))
    for _ in range(_MAX_DOUBTS):
        try:
            sent = send_tasks(client, project_id, todo, timeout_s)
        except ImportOutcomeUnknown as doubt:
            result.landed.extend(t["prompt_id"] for t in doubt.landed)
            result.rejected.extend(doubt.refused)
            result.requests += doubt.requests
            result.reconciled += doubt.reconciled
            there = await_outcome(client, project_id, batch, all_of(doubt.in_doubt),
                                  sent_at=doubt.sent_at, doubt_s=doubt_s)
            todo = _take_landed(result, doubt.in_doubt, there) + doubt.unsent
            continue
        result.landed.extend(t["prompt_id"] for t in sent.landed)
        result.rejected.extend(sent.refused)
        result.requests += sent.requests
        result.reconciled += sent.reconciled
        result.task_ids.update(sent.task_ids)
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
    #: every prompt_id held by two tasks or more: their task ids, ascending
    groups: dict[str, list[int]] = field(default_factory=dict)


def scan_project(client: LabelStudio, project_id: int, prompt_id_of: Any) -> ProjectScan:
    """Read every task's data once and collect the prompt_ids present.

    Tasks created by other means get their id from ``data["prompt"]`` so the same prompt is
    not imported next to them. Later ingest-created copies of a present prompt_id are listed
    as ``duplicates`` (candidates for removal when unannotated).
    """
    ids: set[str] = set()
    dups: list[int] = []
    first: dict[str, int] = {}
    groups: dict[str, list[int]] = {}
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
        if (seen := first.setdefault(pid, task_id)) != task_id:
            groups.setdefault(pid, [seen]).append(task_id)
    return ProjectScan(ids, n, without, dups, groups)


#: Read-only, so safe to retry as a whole.
scan_project_task = io_task(name="scan-project")(scan_project)


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
import_batch_task = io_task(name="import-batch")(import_batch)
