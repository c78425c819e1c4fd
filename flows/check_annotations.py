"""Reconciliation: one look at a project's counters; start a build if the threshold is reached.

Triggered by: the ``check-annotations`` deployment's interval schedule (it covers Label Studio
webhooks that were lost: they have a 1 s timeout and no retries), or the Prefect UI.
Inputs: ``CheckParams`` (project, dataset, threshold, the build deployment's name).
Outputs: a ``CheckReport`` and a table artifact; when the threshold is reached, a flow run of
the build-dataset deployment (``run_deployment``, not waited for) with every setting the check
was given (project, dataset, bucket) over the build deployment's own parameters
(``build_parameters``): the version lands in the configured bucket.
Idempotency: one build run at a time per threshold crossing (project, dataset, baseline
version, threshold). While the crossing's latest build run is scheduled, pending or running,
checks reuse it and create no second run; once it ended without moving the baseline (failed,
crashed, cancelled, or completed with nothing new to commit) the next check starts the next
attempt, keyed ``<crossing>:attempt-<n>`` (``tasks/triggers/crossings.py``), so a failed or empty
build never silences the schedule. Racing checks compute the same key: Prefect creates one
run. One Label Studio API call, two small S3 reads and two Prefect API reads per check.

The fine-tune's reconciliation, in the same check (issue #18): ``refs/latest`` whose
``dataset.versioned`` event the server never confirmed is announced now
(``tasks/build/publish.py``: sent, read back from the API, then marked); an announced
``refs/latest`` that no fine-tune took up ``finetune_grace_s`` after its announcement (the
trigger was lost, e.g. across a server restart) gets one run of ``finetune_deployment``
(``tasks/finetune/sweep.py``: once per version, keyed ``finetune:<dataset>@<version>:reconcile``).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.deployments import run_deployment
from pydantic import BaseModel, Field

from sftflow.tasks.adapters.clients import Clients
from sftflow.tasks.adapters.labelstudio import require_project
from sftflow.tasks.build.publish import announce_latest_task
from sftflow.tasks.finetune.sweep import start_finetune_task, version_to_finetune_task
from sftflow.tasks.triggers.counters import CountMode, ProjectCounters, Threshold, progress
from sftflow.tasks.triggers.crossings import build_parameters, find_attempt_task
from sftflow.tasks.versions.read import load_baseline_task


class CheckParams(BaseModel):
    project: str = Field(..., description="Label Studio project: title or numeric id.")
    dataset: str = Field(..., description="Dataset to build; new = since its last version.")
    min_new: int = Field(..., ge=1, description="New annotated tasks that justify a build.")
    count: CountMode = Field("tasks", description="'tasks' or 'annotations'.")
    min_annotations_per_task: int = Field(1, ge=1, description="See wait_for_annotations.")
    build_deployment: str = Field(
        "build-dataset/build-dataset", description="The build deployment: '<flow>/<deployment>'."
    )
    bucket: str | None = Field(None, description="Bucket of the datasets (empty: configured).")
    finetune_deployment: str | None = Field(
        "finetune/finetune", description="The fine-tune deployment the reconciliation starts for "
        "an announced version no fine-tune took up (empty: none; absent: skipped).")
    finetune_grace_s: float = Field(
        300.0, ge=0, description="How long after its announcement a version is left to the "
        "deployment's trigger before the reconciliation starts its fine-tune.")


class CheckReport(BaseModel):
    reached: bool
    message: str
    project_id: int
    new: int
    min_new: int
    baseline_version: str | None
    idempotency_key: str | None = None
    build_flow_run_id: str | None = None
    attempt: int | None = None
    announced: str | None = Field(None, description="The version this check announced.")
    finetune_flow_run_id: str | None = None
    finetune_started: bool = False


def crossing_key(project_id: int, params: CheckParams, baseline_version: str | None) -> str:
    """The crossing's key: its first build attempt's idempotency key."""
    return ":".join(
        str(x) for x in ("build", project_id, params.dataset, baseline_version, params.count,
                         params.min_annotations_per_task, params.min_new)
    )


@flow(name="check-annotations", flow_run_name="check {params.project} for {params.dataset}")
def check_annotations(params: CheckParams) -> CheckReport:
    """One look at the project's counters; starts a build run when the threshold is reached."""
    logger = get_run_logger()
    clients = Clients.for_bucket(params.bucket)
    counters = ProjectCounters.from_project(require_project(clients.labelstudio, params.project))
    version, baseline = load_baseline_task(
        clients.s3, params.dataset, prefix=clients.settings.datasets.prefix
    )
    threshold = Threshold(min_new=params.min_new, count=params.count,
                          min_annotations_per_task=params.min_annotations_per_task)
    p = progress(counters, threshold, baseline)
    report = CheckReport(
        reached=p.reached, message=p.describe(), project_id=p.project_id, new=p.new,
        min_new=p.min_new, baseline_version=version,
    )
    if p.reached:
        attempt = find_attempt_task(params.build_deployment,
                                    crossing_key(p.project_id, params, version))
        report.idempotency_key, report.attempt = attempt.key, attempt.number
        run = run_deployment(
            params.build_deployment,
            parameters=build_parameters(attempt.deployment_parameters, {
                "project": str(p.project_id), "dataset": params.dataset, "bucket": params.bucket}),
            idempotency_key=attempt.key, tags=[attempt.tag], timeout=0,
        )
        report.build_flow_run_id = str(run.id)
        logger.info("%s: build run %s (%s)", p.describe(), run.name, run.id)
    else:
        logger.info(p.describe())
    reconcile_finetune(params, clients, report)
    create_table_artifact(
        [{"figure": k, "value": str(v)} for k, v in report.model_dump().items()],
        description=report.message,
    )
    return report


def reconcile_finetune(params: CheckParams, clients: Clients, report: CheckReport) -> None:
    """An unconfirmed ``refs/latest`` announced; an announced one without fine-tune started."""
    logger = get_run_logger()
    prefix = clients.settings.datasets.prefix
    report.announced = announce_latest_task(clients.s3, prefix, params.dataset)
    if report.announced:
        logger.info("announced %s@%s (its event was not confirmed before)",
                    params.dataset, report.announced)
    if not params.finetune_deployment:
        return
    version = version_to_finetune_task(
        clients.s3, params.dataset, datasets_prefix=prefix,
        models_prefix=clients.settings.finetune.models_prefix, grace_s=params.finetune_grace_s)
    if version:
        start = start_finetune_task(params.finetune_deployment, params.dataset, version,
                                    {"bucket": params.bucket})
        report.finetune_flow_run_id, report.finetune_started = start.flow_run_id, start.started
        logger.info("%s@%s has no fine-tune: %s", params.dataset, version, start.reason)
