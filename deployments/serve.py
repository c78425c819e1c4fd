"""The sftflow deployments, defined once: schedules, event triggers, concurrency limits.

``sftflow serve`` serves them from this process on the local stack (``prefect.serve``);
``deployments/prefect.yaml`` declares the same four for work pools (``prefect deploy``).
``tests/deployments`` checks that the two stay in step.

- ``ingest``: cron schedule over the whole source prefix, and a trigger on
  ``sftflow.prompts.arrived`` for objects under that prefix (ingests the new object).
- ``check-annotations``: interval schedule; the reconciliation path that covers lost Label
  Studio webhooks: when the threshold is reached it starts a build-dataset run.
- ``build-dataset``: trigger on ``sftflow.annotation.created`` events the bridge labelled
  ``sftflow.threshold=reached`` for this dataset and the configured project (matched on the
  resource id ``sftflow.labelstudio.project.<id>`` when configured by id, on the resource name,
  the project's title, when configured by title), one firing per ``debounce_s`` (``for_each``
  project, ``within``); the bridge gives every event of one threshold crossing the same id, so
  Prefect also drops the repeats. The run's parameters are the configured project and dataset,
  never the event's payload: an event for another project builds nothing. At most one run at a
  time (extra runs wait).
- ``finetune``: trigger on ``sftflow.dataset.versioned`` for this dataset.
- ``draft-responses`` (with ``drafts`` on): triggers on ``sftflow.finetune.succeeded`` for a
  model of this dataset (the flow drafts only if that model is the dataset's best) and on
  ``sftflow.prompts.ingested`` (new prompts, drafted with the best model), in the configured
  project; drafting is idempotent per model, so a spurious firing writes nothing.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, Field

from sftflow.core.events import (
    ANNOTATION_CREATED,
    DATASET_VERSIONED,
    FINETUNE_SUCCEEDED,
    PROMPTS_ARRIVED,
    PROMPTS_INGESTED,
    THRESHOLD_LABEL,
    project_resource,
)
from sftflow.tasks.adapters.s3 import parse_s3_uri
from sftflow.tasks.triggers.counters import CountMode

#: Deployment names (the flow name is prefixed by Prefect: "<flow>/<deployment>").
INGEST, CHECK, BUILD, FINETUNE = "ingest", "check-annotations", "build-dataset", "finetune"
DRAFTS = "draft-responses"


class ServeConfig(BaseModel):
    """What the deployments of one prompt source / project / dataset are set up with."""

    source: str = Field(..., description="s3://bucket/prefix where prompt files land.")
    project: str = Field(..., description="Label Studio project (title or id).")
    dataset: str = Field(..., description="Dataset name the builds write.")
    min_new: int = Field(100, ge=1, description="New annotated tasks that trigger a build.")
    count: CountMode = "tasks"
    ingest_cron: str = Field("*/30 * * * *", description="Cron of the catch-up ingest.")
    check_interval_s: int = Field(900, ge=10, description="Interval of check-annotations.")
    debounce_s: int = Field(300, ge=1, description="At most one build trigger per project per this.")
    base_model: str | None = Field(
        None, description="Base model of the finetune deployment (none: no finetune deployment)."
    )
    backend: str | None = Field(None, description="finetune backend (settings default if empty).")
    bucket: str | None = Field(None, description="Bucket of datasets/models (empty: configured).")
    drafts: Literal["off", "transformers", "openai"] = Field(
        "off", description="Model drafts for annotators (draft-responses deployment): off, or the "
        "generator (transformers: the model itself; openai: the endpoint in settings.drafts).",
    )


def project_match(project: str) -> dict[str, str]:
    """The resource labels of the bridge's events for ``project`` only: its resource id
    (``sftflow.labelstudio.project.<id>``) when it is configured by id, else its title
    (``prefect.resource.name``, the title the bridge read from Label Studio)."""
    if project.strip().isdigit():
        return {**project_resource(int(project))}
    return {"prefect.resource.name": project}


def _prefix_pattern(source: str) -> tuple[str, str]:
    bucket, prefix = parse_s3_uri(source)
    return bucket, f"sftflow.s3.{bucket}.{prefix}*"


def build_deployments(cfg: ServeConfig) -> list[Any]:
    """The ``RunnerDeployment`` objects (apply them, or hand them to ``prefect.serve``).

    Without ``cfg.base_model`` there is no finetune deployment (its flow needs one).
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from sftflow.flows.build_dataset import build_dataset
    from sftflow.flows.check_annotations import check_annotations
    from sftflow.flows.finetune import finetune
    from sftflow.flows.ingest import ingest_prompts

    one_at_a_time = ConcurrencyLimitConfig(
        limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
    )
    tags = ["sftflow", f"dataset:{cfg.dataset}"]
    extra = {"bucket": cfg.bucket} if cfg.bucket else {}

    ingest = _ingest_deployment(ingest_prompts, cfg, tags, one_at_a_time)
    check = _check_deployment(check_annotations, cfg, extra, tags)
    build = _build_deployment(build_dataset, cfg, extra, tags, one_at_a_time)
    if not cfg.base_model:
        return [ingest, check, build]
    tune = _finetune_deployment(finetune, cfg, extra, tags, one_at_a_time)
    deployments = [ingest, check, build, tune]
    if cfg.drafts != "off":
        deployments.append(_drafts_deployment(cfg, extra, tags, one_at_a_time))
    return deployments


def _ingest_deployment(flow: Any, cfg: ServeConfig, tags: list[str], one_at_a_time: Any) -> Any:
    """``ingest``: on the cron schedule over the whole source prefix, and for each object that
    arrives under it (``sftflow.prompts.arrived``)."""
    from prefect.events import DeploymentEventTrigger

    bucket, resource_pattern = _prefix_pattern(cfg.source)
    return flow.to_deployment(
        name=INGEST,
        description="Import new prompt files from S3 into Label Studio.",
        cron=cfg.ingest_cron,
        parameters={"params": {"source": cfg.source, "project": cfg.project}},
        triggers=[
            DeploymentEventTrigger(
                name=f"{INGEST}: prompts arrived under {cfg.source}",
                expect={PROMPTS_ARRIVED},
                match={"prefect.resource.id": resource_pattern, "sftflow.bucket": bucket},
                parameters={"params": {"source": "{{ event.payload.uri }}", "project": cfg.project}},
            )
        ],
        concurrency_limit=one_at_a_time,
        tags=tags,
    )


def _check_deployment(flow: Any, cfg: ServeConfig, extra: dict[str, Any], tags: list[str]) -> Any:
    """``check-annotations``: on the interval schedule; a run that is due while one is still
    running is cancelled."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return flow.to_deployment(
        name=CHECK,
        description="Reconcile: start a build when enough new annotations exist.",
        interval=timedelta(seconds=cfg.check_interval_s),
        parameters={"params": {"project": cfg.project, "dataset": cfg.dataset,
                               "min_new": cfg.min_new, "count": cfg.count, **extra}},
        concurrency_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
        ),
        tags=tags,
    )


def _build_deployment(flow: Any, cfg: ServeConfig, extra: dict[str, Any], tags: list[str],
                      one_at_a_time: Any) -> Any:
    """``build-dataset``: when the bridge says the configured project reached the threshold,
    at most once per ``debounce_s`` per project."""
    from prefect.events import DeploymentEventTrigger

    build_params = {"params": {"project": cfg.project, "dataset": cfg.dataset, **extra}}
    return flow.to_deployment(
        name=BUILD,
        description="Export annotations, filter, deduplicate and commit a dataset version.",
        parameters=build_params,
        triggers=[
            DeploymentEventTrigger(
                name=f"{BUILD}: {cfg.dataset} threshold reached",
                expect={ANNOTATION_CREATED},
                match={THRESHOLD_LABEL: "reached", "sftflow.dataset": cfg.dataset,
                       **project_match(cfg.project)},
                for_each={"prefect.resource.id"},
                threshold=1,
                within=timedelta(seconds=cfg.debounce_s),
                parameters=build_params,
            )
        ],
        concurrency_limit=one_at_a_time,
        tags=tags,
    )


def _finetune_deployment(flow: Any, cfg: ServeConfig, extra: dict[str, Any], tags: list[str],
                         one_at_a_time: Any) -> Any:
    """``finetune``: on each new version of this dataset (``sftflow.dataset.versioned``)."""
    from prefect.events import DeploymentEventTrigger

    finetune_params: dict[str, Any] = {"dataset": cfg.dataset, **extra}
    trigger_params: dict[str, Any] = {
        "dataset": "{{ event.payload.dataset }}@{{ event.payload.version }}", **extra
    }
    for key in ("base_model", "backend"):
        if getattr(cfg, key):
            finetune_params[key] = trigger_params[key] = getattr(cfg, key)
    return flow.to_deployment(
        name=FINETUNE,
        description="Fine-tune on a dataset version and record the model's lineage.",
        parameters={"params": finetune_params},
        triggers=[
            DeploymentEventTrigger(
                name=f"{FINETUNE}: new version of {cfg.dataset}",
                expect={DATASET_VERSIONED},
                match={"prefect.resource.id": f"sftflow.dataset.{cfg.dataset}"},
                parameters={"params": trigger_params},
            )
        ],
        concurrency_limit=one_at_a_time,
        tags=tags,
    )


def _drafts_deployment(cfg: ServeConfig, extra: dict[str, Any], tags: list[str],
                       one_at_a_time: Any) -> Any:
    """``draft-responses``: when a model of this dataset finishes (the flow drafts only with
    the dataset's best model), and when new prompts were ingested (drafted with the best)."""
    from prefect.events import DeploymentEventTrigger

    from sftflow.flows.draft_responses import draft_responses

    base = {"project": cfg.project, "generator": cfg.drafts, **extra}
    return draft_responses.to_deployment(
        name=DRAFTS,
        description="Write the best model's draft on every open task, for annotators to edit.",
        parameters={"params": {"dataset": cfg.dataset, **base}},
        triggers=[
            DeploymentEventTrigger(
                name=f"{DRAFTS}: a model of {cfg.dataset} finished",
                expect={FINETUNE_SUCCEEDED},
                match={"prefect.resource.id": "sftflow.model.*"},
                match_related={"prefect.resource.id": f"sftflow.dataset.{cfg.dataset}",
                               "prefect.resource.role": "dataset"},
                parameters={"params": {"job": "{{ event.payload.job }}", **base}},
            ),
            DeploymentEventTrigger(
                name=f"{DRAFTS}: new prompts in {cfg.project}",
                expect={PROMPTS_INGESTED},
                match={"prefect.resource.id": "sftflow.labelstudio.project.*"},
                parameters={"params": {"dataset": cfg.dataset, **base}},
            ),
        ],
        concurrency_limit=one_at_a_time,
        tags=tags,
    )


def serve(cfg: ServeConfig, limit: int | None = None) -> None:
    """Register the deployments and run their flow runs from this process (blocks); see
    :func:`serve_deployments`."""
    serve_deployments(build_deployments(cfg), limit=limit)


def serve_deployments(deployments: list[Any], limit: int | None = None,
                      zombie_within_s: float | None = None) -> None:
    """Serve ``deployments`` from this process (blocks), after ensuring the zombie automation
    (``zombie_within_s``: its ``within``, default 3 heartbeats). Each flow run's process emits
    heartbeats every ``settings.prefect.heartbeat_s``: a run whose process is killed (this
    one with it) ends Crashed (deployments/zombies.py)."""
    import os

    import prefect
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from sftflow.deployments.zombies import HEARTBEAT_ENV, ensure_zombie_automation, heartbeat_env

    heartbeat_s = int(heartbeat_env()[HEARTBEAT_ENV])
    ensure_zombie_automation(heartbeat_s, zombie_within_s)
    # Each flow run's process gets this process's environment and its current Prefect
    # settings (which wins depends on how the runner starts it): both say heartbeat_s, the
    # frequency the automation's `within` is derived from.
    os.environ[HEARTBEAT_ENV] = str(heartbeat_s)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: heartbeat_s}):
        prefect.serve(*deployments, limit=limit)
