"""One-shot pipeline for batch users: ingest -> wait for annotations -> build -> fine-tune.

Triggered by: ``sftflow run --source s3://... --project NAME --dataset NAME``, or the UI.
Inputs: ``PipelineParams``; each stage is the project's own flow, run as a subflow with
parameters derived from these (one model, so the UI shows one form).
Outputs: a ``PipelineReport`` with every stage's report, and whatever the stages write (tasks in
Label Studio, a dataset version in S3, a model lineage record) and emit (their events).
Stops early, without failing, when annotations did not arrive before the deadline (state
``NotEnough``) or when there was nothing to build; fine-tuning runs only with a ``base_model``.
Idempotency: every stage is idempotent (ingest ledger, content-addressed versions, lineage by
job), so a rerun after a crash continues without duplicates. The build stage holds the
dataset's S3 lock (taken by the ``build_dataset`` flow itself, here with this flow's
``build_lock_timeout_s`` and ``build_lock_lease_s``: ``<bucket>/_sftflow/locks/
sftflow-build-dataset-<dataset>.json``, leased and renewed), so it never overlaps another build
of that dataset, from a pipeline, the CLI or a deployment; the lock lives in the bucket, not in
Prefect, so it survives a Prefect server restart, and a killed build's lock is taken over
after its lease.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.states import Completed
from pydantic import BaseModel, Field

from sftflow.flows.build_dataset import BuildParams, build_dataset
from sftflow.flows.finetune import FinetuneParams, finetune
from sftflow.flows.ingest import IngestParams, ingest_prompts
from sftflow.flows.wait_for_annotations import WaitParams, wait_for_annotations
from sftflow.tasks.finetune.backends import Hyperparameters
from sftflow.tasks.triggers.counters import CountMode


class PipelineParams(BaseModel):
    source: str = Field(..., description="s3://bucket/prefix of the prompt files.")
    project: str = Field(..., description="Label Studio project title or id (created if missing).")
    dataset: str = Field(..., description="Dataset name the build writes.")
    min_new: int = Field(1, ge=1, description="New annotated tasks to wait for before building.")
    count: CountMode = Field("tasks", description="'tasks' or 'annotations'.")
    wait_timeout_s: float = Field(3600.0, gt=0, description="Deadline of the wait stage.")
    min_interval_s: float = Field(60.0, ge=0.05, description="Shortest pause between polls.")
    max_interval_s: float = Field(600.0, ge=0.05, description="Longest pause between polls.")
    base_model: str | None = Field(None, description="Fine-tune this model (empty: no fine-tune).")
    backend: str | None = Field(None, description="Fine-tuning backend (empty: settings default).")
    method: Literal["full", "lora"] = Field("lora", description="Full fine-tune or LoRA adapter (trl).")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters,
                                             description="Training knobs of the fine-tune stage.")
    bucket: str | None = Field(None, description="Bucket of datasets/models (empty: configured).")
    build_lock_timeout_s: float = Field(3600.0, gt=0, description="Wait this long for a build slot.")
    build_lock_lease_s: float | None = Field(
        None, ge=1, description="Lease of the dataset's build lock, renewed every third of it "
        "while the build runs (empty: the setting locks.lease_s, 60 s unless configured).",
    )


class PipelineReport(BaseModel):
    stage: str  # the last stage reached: ingest | wait | build | finetune
    message: str
    ingest: dict[str, Any] | None = None
    wait: dict[str, Any] | None = None
    build: dict[str, Any] | None = None
    finetune: dict[str, Any] | None = None


@flow(name="sft-pipeline", flow_run_name="pipeline {params.project} -> {params.dataset}")
def sft_pipeline(params: PipelineParams) -> PipelineReport:
    """Returns the report; ends ``NotEnough`` when the wait stage timed out."""
    logger = get_run_logger()
    ingested = ingest_prompts(IngestParams(source=params.source, project=params.project))
    report = PipelineReport(stage="ingest", message="", ingest=ingested.model_dump(mode="json"))
    project = str(ingested.project_id)

    waited = wait_for_annotations(WaitParams(
        project=project, min_new=params.min_new, dataset=params.dataset, count=params.count,
        timeout_s=params.wait_timeout_s, min_interval_s=params.min_interval_s,
        max_interval_s=max(params.max_interval_s, params.min_interval_s), bucket=params.bucket,
    ))
    report.stage, report.wait = "wait", waited.model_dump(mode="json")
    if not waited.reached:
        report.message = waited.message
        logger.info(report.message)
        return Completed(name="NotEnough", message=report.message, data=report)

    built = build_dataset(BuildParams(  # the build flow takes the dataset's build lock
        project=project, dataset=params.dataset, bucket=params.bucket,
        lock_timeout_s=params.build_lock_timeout_s, lock_lease_s=params.build_lock_lease_s))
    report.stage, report.build = "build", built.model_dump(mode="json")
    report.message = built.message
    if built.version is None or not params.base_model:
        return report

    tuned = finetune(FinetuneParams(
        dataset=f"{params.dataset}@{built.version}", base_model=params.base_model,
        backend=params.backend, method=params.method, hyperparameters=params.hyperparameters,
        bucket=params.bucket,
    ))
    report.stage, report.finetune = "finetune", tuned.model_dump(mode="json")
    report.message = f"{built.message}; fine-tune {tuned.job}: {tuned.status}"
    return report
