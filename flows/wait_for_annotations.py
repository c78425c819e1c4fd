"""Wait until a Label Studio project has enough new annotations, or give up at a deadline.

Triggered by: ``sftflow wait``, the ``sft_pipeline`` flow (as a subflow), or the Prefect UI.
Inputs: ``WaitParams`` - the project, how many new annotated tasks (or annotations) are
"enough", counted since the last version of ``dataset`` (the counters recorded in its
manifest; since the project began when there is none), the deadline and the poll intervals.
Outputs: a ``WaitReport``; a progress artifact (fraction reached) updated at every poll and
a table artifact with the final figures. Nothing is written to S3 and no event is emitted.
Final state: ``Completed`` when enough annotations exist; ``Completed`` named ``NotEnough``
with the message "not enough annotations yet: 37 of 500" at the deadline (not an exception).
A deleted or missing project fails the run with an error naming it.
Cost: one Label Studio API call per poll; polls are at least ``min_interval_s`` apart, so the
default 60 s means at most about 60 calls per hour of waiting.
Idempotency: read-only; rerunning it is always safe.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.states import Completed
from pydantic import BaseModel, Field, model_validator

from sftflow.tasks.adapters.clients import Clients
from sftflow.tasks.runtime.declare import artifact_key
from sftflow.tasks.runtime.polling import Backoff
from sftflow.tasks.triggers.counters import CountMode, Threshold, Watch, watch_progress
from sftflow.tasks.versions.read import load_baseline_task


class WaitParams(BaseModel):
    project: str = Field(..., description="Label Studio project: title or numeric id.")
    min_new: int = Field(..., ge=1, description="How many new annotated tasks are enough.")
    dataset: str | None = Field(
        None,
        description="Count what is new since the last version of this dataset "
        "(empty: count everything in the project).",
    )
    count: CountMode = Field(
        "tasks", description="'tasks': annotated tasks; 'annotations': total annotations."
    )
    min_annotations_per_task: int = Field(
        1, ge=1, description="Annotations a task needs to count (above 1: the project overlap)."
    )
    timeout_s: float = Field(3600.0, gt=0, description="Give up after this many seconds.")
    min_interval_s: float = Field(
        60.0, ge=0.05, description="Shortest pause between polls (60 s: <= ~60 API calls/hour)."
    )
    max_interval_s: float = Field(600.0, ge=0.05, description="Longest pause between polls.")
    bucket: str | None = Field(
        None, description="Bucket holding the dataset versions (empty: the configured bucket)."
    )

    @model_validator(mode="after")
    def _intervals(self) -> WaitParams:
        if self.max_interval_s < self.min_interval_s:
            raise ValueError("max_interval_s must be >= min_interval_s")
        return self

    def threshold(self) -> Threshold:
        return Threshold(
            min_new=self.min_new,
            count=self.count,
            min_annotations_per_task=self.min_annotations_per_task,
        )


class WaitReport(BaseModel):
    reached: bool
    message: str
    project: str
    project_id: int | None = None
    counter: str | None = None
    current: int | None = None
    baseline: int = 0
    baseline_version: str | None = None
    new: int = 0
    min_new: int
    polls: int = 0
    api_calls: int = 0
    failed_polls: int = 0
    last_error: str | None = None
    waited_s: float = 0.0

    @classmethod
    def of(cls, params: WaitParams, baseline_version: str | None, watch: Watch) -> WaitReport:
        report = cls(
            reached=watch.reached, message="", project=params.project, min_new=params.min_new,
            baseline_version=baseline_version, polls=watch.polls, api_calls=watch.polls,
            failed_polls=watch.failed_polls, last_error=watch.last_error, waited_s=watch.waited_s,
        )
        if p := watch.progress:
            report.project_id, report.counter = p.project_id, p.counter
            report.current, report.baseline, report.new = p.current, p.baseline, p.new
        if watch.reached:
            report.message = watch.progress.describe()
        else:
            report.message = f"not enough annotations yet: {max(0, report.new)} of {params.min_new}"
            if report.current is None and report.last_error:
                report.message += f" (Label Studio unreachable: {report.last_error})"
        return report


def _progress_key(project: str) -> str:
    return artifact_key("wait-annotations", artifact_key(project)[:40].strip("-") or "project")


@flow(name="wait-for-annotations", flow_run_name="wait {params.project}: {params.min_new} new")
def wait_for_annotations(params: WaitParams) -> WaitReport:
    """Poll a project's counters until enough new annotations exist, or the deadline.
    Returns the report; the run ends Completed, or Completed named NotEnough at the deadline."""
    logger = get_run_logger()
    clients = Clients.for_bucket(params.bucket)
    baseline_version, baseline = load_baseline_task(
        clients.s3, params.dataset, prefix=clients.settings.datasets.prefix
    )
    logger.info(
        "waiting for %d new %s in project %r (baseline: %s), deadline %.0f s",
        params.min_new, params.count, params.project, baseline_version or "none", params.timeout_s,
    )
    artifact_id = create_progress_artifact(
        0.0, key=_progress_key(params.project),
        description=f"New annotations in {params.project!r}: fraction of {params.min_new}",
    )
    watch = watch_progress(
        clients.labelstudio, params.project, params.threshold(), baseline,
        timeout_s=params.timeout_s,
        backoff=Backoff(params.min_interval_s, params.max_interval_s),
        on_progress=lambda p: update_progress_artifact(artifact_id, round(100 * p.fraction, 1)),
        logger=logger,
    )
    report = WaitReport.of(params, baseline_version, watch)
    create_table_artifact(
        [{"figure": k, "value": str(v)} for k, v in report.model_dump().items() if k != "message"],
        description=report.message,
    )
    logger.info(report.message)
    if report.reached:
        return Completed(message=report.message, data=report)
    return Completed(name="NotEnough", message=report.message, data=report)
