"""Label Studio project counters and the "enough new annotations?" arithmetic.

One ``GET /api/projects/<id>`` returns every counter we need, so one poll costs one API call.
The same counters arrive in the ``project`` object of every Label Studio webhook payload,
so the webhook bridge and ``wait_for_annotations`` share the threshold logic below; the
baseline (the counters recorded by the dataset's last version) is read by
``versions.read.load_baseline``.

What the counters mean (checked against Label Studio 1.23 with annotations created through
the API): ``num_tasks_with_annotations`` counts tasks with at least one non-cancelled
annotation, ``total_annotations_number`` counts non-cancelled annotations,
``finished_task_number`` counts tasks that reached the project's overlap
(``maximum_annotations``), ``skipped_annotations_number`` counts cancelled ones.
Tasks imported with annotations attached are counted in ``total_annotations_number`` but not
always in ``num_tasks_with_annotations`` (see docs/events.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sftflow.core.errors import ConfigError
from sftflow.tasks.adapters.labelstudio import require_project
from sftflow.tasks.runtime.declare import io_task
from sftflow.tasks.runtime.polling import Backoff, wait_until

CountMode = Literal["tasks", "annotations"]

_FIELDS = (
    "task_number",
    "num_tasks_with_annotations",
    "total_annotations_number",
    "finished_task_number",
    "skipped_annotations_number",
)


class ProjectCounters(BaseModel):
    project_id: int
    title: str = ""
    task_number: int = 0
    num_tasks_with_annotations: int = 0
    total_annotations_number: int = 0
    finished_task_number: int = 0
    skipped_annotations_number: int = 0
    maximum_annotations: int = 1

    @classmethod
    def from_project(cls, project: Any) -> ProjectCounters:
        """From an SDK project object or the ``project`` dict of a webhook payload."""
        get = project.get if isinstance(project, dict) else lambda k, d=None: getattr(project, k, d)
        if get("id") is None:
            raise ValueError("project has no id")
        values = {k: int(get(k) or 0) for k in _FIELDS}
        return cls(
            project_id=int(get("id")),
            title=str(get("title") or ""),
            maximum_annotations=int(get("maximum_annotations") or 1),
            **values,
        )


#: The largest counter or id accepted from a webhook body (Label Studio's are 64-bit).
MAX_COUNT = 2**63 - 1


class WebhookProject(BaseModel):
    """The ``project`` object of a webhook body, checked strictly: numbers must be JSON
    integers (not strings, floats or booleans) within 64 bits, the title a string."""

    model_config = ConfigDict(strict=True, extra="ignore")

    id: int = Field(ge=1, le=MAX_COUNT)
    title: str | None = None
    task_number: int | None = Field(None, ge=0, le=MAX_COUNT)
    num_tasks_with_annotations: int | None = Field(None, ge=0, le=MAX_COUNT)
    total_annotations_number: int | None = Field(None, ge=0, le=MAX_COUNT)
    finished_task_number: int | None = Field(None, ge=0, le=MAX_COUNT)
    skipped_annotations_number: int | None = Field(None, ge=0, le=MAX_COUNT)
    maximum_annotations: int | None = Field(None, ge=1, le=MAX_COUNT)


def counters_from_webhook(project: dict[str, Any]) -> ProjectCounters:
    """The counters a webhook body claims; ValueError naming each field that is wrong."""
    try:
        checked = WebhookProject.model_validate(project)
    except ValidationError as err:
        problems = "; ".join(
            f"project.{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise ValueError(problems) from None
    return ProjectCounters.from_project(checked.model_dump())


class Threshold(BaseModel):
    """What "enough" means: ``min_new`` more tasks (or annotations) than at the baseline."""

    min_new: int = Field(..., ge=1, description="How many new annotated tasks (or annotations).")
    count: CountMode = Field(
        "tasks",
        description="'tasks': tasks with at least `min_annotations_per_task` non-cancelled "
        "annotations; 'annotations': total non-cancelled annotations.",
    )
    min_annotations_per_task: int = Field(
        1,
        ge=1,
        description="For count='tasks': annotations a task needs to count. Values above 1 must "
        "equal the project's overlap (maximum_annotations), whose counter Label Studio keeps.",
    )


def counter_field(threshold: Threshold, maximum_annotations: int) -> str:
    """The name of the project counter that measures ``threshold``."""
    if threshold.count == "annotations":
        return "total_annotations_number"
    k = threshold.min_annotations_per_task
    if k == 1:
        return "num_tasks_with_annotations"
    if k == maximum_annotations:
        return "finished_task_number"
    raise ConfigError(
        f"min_annotations_per_task={k} needs the project's overlap (maximum_annotations, now "
        f"{maximum_annotations}) set to {k}: Label Studio only counts tasks that reach it"
    )


class Progress(BaseModel):
    """Where a project stands against a threshold."""

    project_id: int
    project: str
    counter: str
    current: int
    baseline: int
    new: int
    min_new: int
    reached: bool

    @property
    def fraction(self) -> float:
        return min(1.0, max(0, self.new) / self.min_new)

    def describe(self) -> str:
        if self.reached:
            return f"enough annotations: {self.new} of {self.min_new} new ({self.counter})"
        return f"not enough annotations yet: {max(0, self.new)} of {self.min_new}"


def baseline_value(baseline: dict[str, Any] | None, field: str, project_id: int) -> int:
    """The counter's value at the last dataset version (0 when there is none).

    A baseline recorded for another project (the dataset was built from a different one)
    does not apply. ``finished_task_number`` falls back to ``num_tasks_with_annotations``
    when the manifest did not record it.
    """
    if not baseline:
        return 0
    recorded = baseline.get("project_id")
    if recorded is not None and str(recorded) != str(project_id):
        return 0
    value = baseline.get(field)
    if value is None and field == "finished_task_number":
        value = baseline.get("num_tasks_with_annotations")
    return int(value or 0)


def progress(
    counters: ProjectCounters, threshold: Threshold, baseline: dict[str, Any] | None
) -> Progress:
    field = counter_field(threshold, counters.maximum_annotations)
    current = int(getattr(counters, field))
    base = baseline_value(baseline, field, counters.project_id)
    new = current - base
    return Progress(
        project_id=counters.project_id,
        project=counters.title,
        counter=field,
        current=current,
        baseline=base,
        new=new,
        min_new=threshold.min_new,
        reached=new >= threshold.min_new,
    )


# No task-level retries: the caller polls in a loop that owns backoff and the deadline.
def fetch_counters(client: Any, project_id: int, timeout_s: float | None = None) -> ProjectCounters:
    """One API call. A missing (deleted) project is a ConfigError naming it. ``timeout_s``: a
    short HTTP timeout, no SDK retries (for callers that must answer fast: the bridge)."""
    from label_studio_sdk.core.api_error import ApiError

    options = None if timeout_s is None else {"timeout_in_seconds": timeout_s, "max_retries": 0}
    try:
        return ProjectCounters.from_project(
            client.projects.get(id=int(project_id), request_options=options))
    except ApiError as err:
        if err.status_code == 404:
            raise ConfigError(
                f"Label Studio project {project_id} does not exist (deleted?)"
            ) from err
        raise


@dataclass
class Watch:
    """What a wait for annotations saw: the last successful poll's progress, and the polls."""

    progress: Progress | None = None
    polls: int = 0  # one Label Studio API call each
    failed_polls: int = 0
    last_error: str | None = None
    waited_s: float = 0.0

    @property
    def reached(self) -> bool:
        return bool(self.progress and self.progress.reached)


def watch_progress(
    client: Any, project: str, threshold: Threshold, baseline: dict[str, Any] | None, *,
    timeout_s: float, backoff: Backoff, on_progress: Callable[[Progress], None] | None = None,
    logger: Any = None,
) -> Watch:
    """Poll ``project``'s counters (title or id, resolved on the first poll) until
    ``threshold`` is reached against ``baseline``, or ``timeout_s`` passes. A poll that fails
    (service down) is counted and retried within the deadline; a ConfigError (missing project,
    impossible threshold) is raised. Progress resets the backoff to its shortest pause."""
    watch = Watch()
    project_id: int | None = None
    progressed = False

    def poll() -> bool:
        nonlocal project_id, progressed
        watch.polls += 1
        progressed = False
        try:
            if project_id is None:  # resolve once (title -> id); the listing carries counters
                counters = ProjectCounters.from_project(require_project(client, project))
                project_id = counters.project_id
            else:
                counters = fetch_counters_task(client, project_id)
        except ConfigError:
            raise  # missing/deleted project, bad threshold: not something waiting fixes
        except Exception as err:  # noqa: BLE001 - service down: try again within the deadline
            watch.failed_polls += 1
            watch.last_error = f"{type(err).__name__}: {err}"[:300]
            if logger:
                logger.warning("poll %d failed: %s", watch.polls, watch.last_error)
            return False
        p = progress(counters, threshold, baseline)
        progressed = watch.progress is not None and p.new > watch.progress.new
        watch.progress = p
        if on_progress:
            on_progress(p)
        if logger:
            logger.info("poll %d: %s", watch.polls, p.describe())
        return p.reached

    started = time.monotonic()
    wait_until(poll, timeout_s=timeout_s, backoff=backoff, progressed=lambda _: progressed)
    watch.waited_s = round(time.monotonic() - started, 3)
    return watch


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
fetch_counters_task = io_task(name="poll-project-counters", retries=0)(fetch_counters)
