"""Flow ``draft-responses``: a model's draft response on every open task, for annotators to edit.

Trigger (to be wired by a deployment): ``sftflow.finetune.succeeded``, whose resource is
``sftflow.model.<job>`` and payload ``{job, dataset, version, backend, status}``; pass
``{"job": "{{ event.payload.job }}"}``. That event fires for every finished job, promoted or
not: with ``only_if_best`` (default) a job that is not its dataset's ``best`` (the
``_refs/<dataset>/best`` ref the finetune flow's eval gate moves) drafts nothing. New prompts
arriving later: ``sftflow.prompts.ingested`` (resource ``sftflow.labelstudio.project.<id>``)
with ``{"dataset": D, "project": "{{ event.payload.project_id }}"}`` drafts them with the
dataset's current best model. Manual runs: ``sftflow drafts --job JOB`` (or ``--dataset``),
Python, or the Prefect UI.

Inputs: ``DraftParams``: the model (a job id, a dataset's best, or a model folder with its
``model_version``), the Label Studio project (default: the one the model's training data was
exported from), the generator (``transformers``: the model itself; ``openai``: an
OpenAI-compatible chat endpoint from ``settings.drafts``), limits.

Outputs: one Label Studio prediction per open task on the SFT TextArea, ``model_version`` =
the job id; the project set to pre-fill the form with that model's predictions; a table
artifact ``drafts-<project>-counts`` (drafted, skipped and failed by reason); the event
``sftflow.drafts.written`` {project_id, model_version, generator, drafted, skipped, failed,
deferred, tasks_seen} when at least one draft was written.

Idempotency: a task never gets two drafts from one model (each write checks the task's
predictions first, retries included); a rerun drafts only tasks still open, e.g. those that
failed. Annotated tasks are never drafted. A failed draft is counted, never fatal.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event
from pydantic import BaseModel, Field

from sftflow.core import events
from sftflow.core.errors import ConfigError
from sftflow.tasks.adapters.clients import Clients
from sftflow.tasks.adapters.labelstudio import require_project
from sftflow.tasks.drafts.model import GeneratorKind, build_generator, resolve_model_task
from sftflow.tasks.drafts.stage import (
    DraftReport,
    draft_batch_task,
    draft_open_tasks,
    select_drafts_task,
)
from sftflow.tasks.runtime.declare import artifact_key


class DraftParams(BaseModel):
    job: str | None = Field(None, description="Fine-tune job id whose model drafts (e.g. the "
                            "succeeded event's payload.job).")
    dataset: str | None = Field(None, description="Instead of a job: the dataset's best model.")
    model: str | None = Field(None, description="Instead of a job: a model folder or s3:// prefix.")
    model_version: str | None = Field(None, description="With `model`: the id written on its drafts.")
    project: str | None = Field(None, description="Label Studio project, title or id (empty: the "
                                "project the model's training data came from).")
    generator: GeneratorKind = Field("transformers", description="transformers (the model itself) or "
                                     "openai (an OpenAI-compatible chat endpoint: settings.drafts).")
    only_if_best: bool = Field(True, description="Draft only with the dataset's best model (a job "
                               "that was not promoted drafts nothing).")
    max_tasks: int | None = Field(None, ge=1, description="Draft at most this many tasks this run.")
    batch_size: int | None = Field(None, ge=1, description="Prompts per batch (empty: settings).")
    page_size: int = Field(100, ge=1, le=1000, description="Tasks read per Label Studio page.")
    max_new_tokens: int | None = Field(None, ge=1, description="Longest draft (empty: settings).")
    select_in_project: bool = Field(True, description="Make the project pre-fill the annotation "
                                    "form with this model's drafts.")
    bucket: str | None = Field(None, description="Bucket of models and datasets (empty: configured).")


@flow(name="draft-responses", flow_run_name="drafts: job {params.job}, dataset {params.dataset}")
def draft_responses(params: DraftParams) -> DraftReport | None:
    """Write a model's draft response on every open Label Studio task (no annotation, no draft
    from this model yet) as a prediction annotators edit; see the module docstring."""
    logger = get_run_logger()
    clients = Clients.for_bucket(params.bucket)
    s3, ls, settings = clients.s3, clients.labelstudio, clients.settings
    model = resolve_model_task(s3, settings.finetune.models_prefix, settings.datasets.prefix,
                               job=params.job, dataset=params.dataset, location=params.model,
                               model_version=params.model_version)
    if params.only_if_best and model.best is False:
        logger.info("model %s is not the best of %s: no drafts", model.model_version, model.dataset)
        return None
    if params.project is None and model.project_id is None:
        raise ConfigError(f"no project to draft in: model {model.model_version} names none; pass project")
    project = require_project(ls, params.project or model.project_id)

    with tempfile.TemporaryDirectory(prefix="sftflow-drafts-") as tmp:
        generator = build_generator(params.generator, model, settings, s3, workdir=Path(tmp),
                                    max_new_tokens=params.max_new_tokens)
        report = draft_open_tasks(ls, int(project.id), generator, generator_kind=params.generator,
                                  page_size=params.page_size, max_tasks=params.max_tasks,
                                  batch_size=params.batch_size or settings.drafts.batch_size,
                                  run_batch=draft_batch_task)
    if params.select_in_project and report.has_drafts:  # Label Studio refuses a version without any
        select_drafts_task(ls, int(project.id), model.model_version)
    logger.info(report.summary())
    create_table_artifact(report.table(), key=artifact_key("drafts", project.id, "counts"),
                          description=f"Drafts of {model.model_version} in {project.title}: {report.summary()}")
    if report.drafted:
        emit_event(event=events.DRAFTS_WRITTEN, resource=events.project_resource(project.id),
                   related=[{**events.model_resource(model.model_version), "prefect.resource.role": "model"}],
                   payload=report.event_payload())
    return report
