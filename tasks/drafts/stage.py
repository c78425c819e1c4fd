"""The drafting stage: a model's draft response on every open task of a Label Studio project.

A task is *open* for a model when it has no annotation (cancelled ones, i.e. skips, do not
count) and no prediction with the model's ``model_version``. Tasks are read a page at a time
(the listing's own ``annotations`` and ``predictions``: Label Studio 1.23 lists the
``total_*`` counters as 0), drafted in batches, and each draft is written as a prediction on
the SFT TextArea (``from_name="instruction"``, ``to_name="prompt"``, ``type="textarea"``).

Idempotency: just before each write the task's predictions are read again, and a write is
retried only through that check, so a task never gets two drafts from one model: not from a
rerun, not from a lost response to a create, and (within the few milliseconds between check
and write) not from two runs at once. A rerun drafts only what is still open.

Every task ends in exactly one count of :class:`DraftReport`: drafted, skipped (by reason) or
failed (by reason, with the first failures' messages); a failure is never fatal for the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from sftflow.tasks.adapters.labelstudio import PROMPT_NAME, RESPONSE_NAME
from sftflow.tasks.drafts.generators import DraftGenerator, failure_reason
from sftflow.tasks.runtime.declare import io_task
from sftflow.tasks.runtime.polling import Backoff, retry

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

#: Failures whose messages the report keeps (the counts cover all of them).
MAX_FAILURE_SAMPLES = 50


def draft_result(text: str) -> list[dict[str, Any]]:
    """The ``result`` of a prediction holding ``text`` in the SFT TextArea."""
    return [{"from_name": RESPONSE_NAME, "to_name": PROMPT_NAME, "type": "textarea",
             "value": {"text": [text]}}]


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


@dataclass(frozen=True)
class OpenTask:
    id: int
    prompt: str


def classify(task: Any, model_version: str) -> OpenTask | str:
    """The task to draft, or why it is skipped: ``annotated``, ``already_drafted`` or
    ``no_prompt``. ``task`` is a listed task (SDK object or dict, with ``fields="all"``)."""
    if any(not _get(a, "was_cancelled") for a in _get(task, "annotations") or []):
        return "annotated"
    if any(_get(p, "model_version") == model_version for p in _get(task, "predictions") or []):
        return "already_drafted"
    prompt = (_get(task, "data") or {}).get(PROMPT_NAME)
    if not isinstance(prompt, str) or not prompt.strip():
        return "no_prompt"
    return OpenTask(int(_get(task, "id")), prompt)


def task_pages(ls: LabelStudio, project_id: int, page_size: int) -> Iterator[list[Any]]:
    """The project's tasks, ``page_size`` at a time, with their annotations and predictions."""
    pager = ls.tasks.list(project=project_id, fields="all", page_size=page_size)
    page: list[Any] = []
    for task in pager:
        page.append(task)
        if len(page) == page_size:
            yield page
            page = []
    if page:
        yield page


class DraftFailure(BaseModel):
    task_id: int
    reason: str
    message: str


class BatchOutcome(BaseModel):
    drafted: int = 0
    skipped: dict[str, int] = Field(default_factory=dict)
    failures: list[DraftFailure] = Field(default_factory=list)


class DraftReport(BaseModel):
    """What one drafting run did, task by task."""

    project_id: int
    model_version: str
    generator: str = Field(description="transformers | openai")
    tasks_seen: int = Field(0, description="Tasks listed in the project.")
    drafted: int = Field(0, description="Tasks that got this model's draft in this run.")
    skipped: dict[str, int] = Field(default_factory=dict, description="reason -> tasks: "
                                    "annotated, already_drafted, no_prompt.")
    failed: dict[str, int] = Field(default_factory=dict, description="reason -> tasks.")
    deferred: int = Field(0, description="Open tasks left for a later run by max_tasks.")
    failures: list[DraftFailure] = Field(default_factory=list,
                                         description=f"The first {MAX_FAILURE_SAMPLES} failures.")

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def has_drafts(self) -> bool:
        """Whether the project holds drafts of this model (written now or before)."""
        return bool(self.drafted or self.skipped.get("already_drafted"))

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def add(self, outcome: BatchOutcome) -> None:
        self.drafted += outcome.drafted
        for reason, n in outcome.skipped.items():
            self.skip(reason, n)
        for failure in outcome.failures:
            self.failed[failure.reason] = self.failed.get(failure.reason, 0) + 1
        room = MAX_FAILURE_SAMPLES - len(self.failures)
        self.failures += outcome.failures[:max(0, room)]

    def table(self) -> list[dict[str, Any]]:
        """Rows of the counts artifact: one per outcome and reason."""
        rows = [{"outcome": "drafted", "reason": "", "tasks": self.drafted}]
        rows += [{"outcome": "skipped", "reason": r, "tasks": n} for r, n in sorted(self.skipped.items())]
        rows += [{"outcome": "failed", "reason": r, "tasks": n} for r, n in sorted(self.failed.items())]
        if self.deferred:
            rows.append({"outcome": "deferred", "reason": "max_tasks", "tasks": self.deferred})
        return rows

    def summary(self) -> str:
        return (f"model {self.model_version} on project {self.project_id}: {self.drafted} drafted, "
                f"{self.skipped_total} skipped {self.skipped or ''}, {self.failed_total} failed "
                f"{self.failed or ''}, {self.deferred} deferred ({self.tasks_seen} tasks seen)")

    def event_payload(self) -> dict[str, Any]:
        return {"project_id": self.project_id, "model_version": self.model_version,
                "generator": self.generator, "drafted": self.drafted, "skipped": self.skipped,
                "failed": self.failed, "deferred": self.deferred, "tasks_seen": self.tasks_seen}


def _has_draft(ls: LabelStudio, task_id: int, model_version: str) -> bool:
    return any(p.model_version == model_version for p in ls.predictions.list(task=task_id))


def write_draft(ls: LabelStudio, task_id: int, text: str, model_version: str, *,
                attempts: int = 4, backoff: Backoff | None = None) -> bool:
    """Write the draft unless the task already has one from ``model_version``; True when this
    call wrote it. Every attempt checks first, so a retry after a lost response never writes
    a second prediction (the SDK's own retries are off for the create: they do not check)."""
    tries = 0

    def once() -> bool:
        nonlocal tries
        tries += 1
        if _has_draft(ls, task_id, model_version):
            return tries > 1  # found on a retry: our own write whose answer was lost
        # The SDK would resend a create whose answer was a 5xx, without our check first.
        ls.predictions.create(task=task_id, result=draft_result(text), model_version=model_version,
                              request_options={"max_retries": 0})
        return True

    return retry(once, attempts=attempts, backoff=backoff or Backoff(0.5, 8.0))


def draft_batch(ls: LabelStudio, generator: DraftGenerator, batch: list[OpenTask], *,
                write_attempts: int = 4) -> BatchOutcome:
    """Generate and write the drafts of one batch; every task ends in one count."""
    outcome = BatchOutcome()
    results = generator.generate([t.prompt for t in batch])
    for task, result in zip(batch, results, strict=True):
        if isinstance(result, Exception):
            outcome.failures.append(DraftFailure(task_id=task.id, reason=failure_reason(result),
                                                 message=str(result)[:300]))
            continue
        try:
            wrote = write_draft(ls, task.id, result, generator.model_version, attempts=write_attempts)
        except Exception as err:  # noqa: BLE001 - one task's failure, counted, never the batch's
            outcome.failures.append(DraftFailure(task_id=task.id, reason=f"write: {failure_reason(err)}",
                                                 message=str(err)[:300]))
            continue
        if wrote:
            outcome.drafted += 1
        else:
            outcome.skipped["already_drafted"] = outcome.skipped.get("already_drafted", 0) + 1
    return outcome


def draft_open_tasks(
    ls: LabelStudio, project_id: int, generator: DraftGenerator, *, generator_kind: str,
    page_size: int = 100, batch_size: int = 8, max_tasks: int | None = None,
    run_batch: Callable[..., BatchOutcome] = draft_batch,
) -> DraftReport:
    """Draft every open task of the project (at most ``max_tasks``), a page and a batch at a
    time. ``run_batch`` is :func:`draft_batch` or its Prefect task (one task run per batch)."""
    report = DraftReport(project_id=project_id, model_version=generator.model_version,
                         generator=generator_kind)
    budget = max_tasks
    for page in task_pages(ls, project_id, page_size):
        report.tasks_seen += len(page)
        todo: list[OpenTask] = []
        for task in page:
            found = classify(task, generator.model_version)
            if isinstance(found, str):
                report.skip(found)
            elif budget is not None and budget <= 0:
                report.deferred += 1
            else:
                todo.append(found)
                budget = None if budget is None else budget - 1
        for start in range(0, len(todo), batch_size):
            report.add(run_batch(ls, generator, todo[start:start + batch_size]))
    return report


def select_drafts(ls: LabelStudio, project_id: int, model_version: str) -> None:
    """Make the project pre-fill the annotation form with ``model_version``'s predictions
    (Label Studio accepts only a version some prediction of the project carries)."""
    ls.projects.update(id=project_id, model_version=model_version, show_collab_predictions=True)


draft_batch_task = io_task(name="draft-batch")(draft_batch)
select_drafts_task = io_task(name="select-drafts")(select_drafts)
