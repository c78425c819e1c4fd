"""Flow ``build_dataset``: Label Studio annotations -> an immutable dataset version in S3.

Triggered by: ``sftflow build --project P --dataset D``, the pipeline flow, or a deployment
run (e.g. after ``wait_for_annotations``).

Inputs: ``BuildParams`` (project, dataset, annotation policy, filters, dedup, eval fraction).

Steps: export snapshot of the project (create, poll with a deadline, download, streaming
parse) -> filters + PII/secret scan (mapped over shards) -> MinHash fingerprints (mapped over
shards) -> exact + near dedup with the keep rule -> train/eval split by cluster (leakage
checked to be 0) -> commit (content-addressed shards, JSONL formats, card, exclusions,
manifest, ``refs/latest`` CAS).

Outputs: ``s3://<bucket>/<datasets.prefix>/<dataset>/versions/<version>/manifest.json`` and
the files it lists; artifacts (counts table, version link, dedup examples); the event
``sftflow.dataset.versioned`` {dataset, version, project_id, rows_train, rows_eval, created},
with the version's deterministic event id, emitted when the version is ``refs/latest`` and its
event was not recorded yet (``refs/announced/<version>``, written after the emission): a
retry or a rerun after a crash past the manifest or the ref still announces it, Prefect drops a
repeat of the id, and an unchanged rebuild of an announced version stays quiet.

Idempotency: the version id is a hash of the rows and the build config, so rebuilding
unchanged annotations writes nothing and returns the existing version. A crash at any point
leaves ``refs/latest`` on a complete version; a rerun completes the commit.

Large inputs (rows, the parent's state) go to tasks wrapped in ``quote``: Prefect would
otherwise walk every row looking for futures (2 s per 50k rows, per task).

Task runner: the default thread pool, or ``build_dataset_on(dask_address)`` for a
``dask.distributed`` cluster (the mapped filter and fingerprint tasks run on its workers).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, runtime, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from pydantic import BaseModel, Field

import sftflow
from sftflow.core import events
from sftflow.tasks.adapters.clients import Clients
from sftflow.tasks.adapters.labelstudio import RESPONSE_NAME, require_project
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.build import stages as build
from sftflow.tasks.build.delta import ls_time, watermark
from sftflow.tasks.build.export import (
    AnnotationPolicy,
    create_snapshot_task,
    delete_snapshot,
    download_snapshot_task,
    parse_tasks,
)
from sftflow.tasks.build.filters import FilterConfig, filter_rows_task
from sftflow.tasks.build.pictures import import_in_background, publish_version_pictures_task
from sftflow.tasks.build.stages import fingerprint_task, stable_split_task
from sftflow.tasks.dedup import DedupConfig
from sftflow.tasks.drafts import figures
from sftflow.tasks.runtime.declare import artifact_key, io_task
from sftflow.tasks.versions import commit as version_commit
from sftflow.tasks.versions import formats, keys, refs


class BuildParams(BaseModel):
    project: str = Field(..., description="Label Studio project: title or numeric id.")
    dataset: str = Field(..., description="Dataset name (letters, digits, '.', '_', '-').")
    annotation_policy: AnnotationPolicy = Field(
        "latest",
        description="Several annotations on a task: 'latest' (default), 'ground_truth_first' "
        "(the ground-truth one, else the latest), or 'all' (one row per annotation).",
    )
    response_name: str = Field(
        RESPONSE_NAME, description="Name of the TextArea holding the response (from_name)."
    )
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Row filters.")
    dedup: DedupConfig = Field(
        default_factory=DedupConfig, description="Exact and near-duplicate removal."
    )
    eval_fraction: float = Field(
        0.1, ge=0.0, le=0.9, description="Share of dedup clusters that go to the eval split."
    )
    split_seed: int = Field(0, description="Seed of the cluster -> split hash.")
    system_prompt: str | None = Field(
        None, description="Optional system message in the OpenAI chat files."
    )
    tag: str | None = Field(None, description="Also point this tag at the version.")
    bucket: str | None = Field(
        None, description="Bucket of the dataset versions (empty: the configured bucket)."
    )
    shard_rows: int | None = Field(
        None, ge=1, description="Rows per Parquet shard (empty: settings.datasets.shard_rows)."
    )
    export_timeout_s: float = Field(
        900.0, gt=0, description="One deadline for the export snapshot: its creation (retries "
        "included) and Label Studio finishing it."
    )
    keep_snapshot: bool = Field(
        False, description="Keep the export snapshot on the Label Studio server afterwards."
    )
    draft_policy: figures.DraftPolicy = Field(
        figures.DEFAULT_DRAFT_POLICY,
        description="Rows whose response is a model's draft accepted unchanged: 'exclude' "
        "(default: no model trains on its own unedited outputs unless someone decides so; "
        "they go to exclusions as accepted_draft_unchanged) or 'include'.",
    )
    mode: Literal["auto", "full", "scratch"] = Field(
        "auto", description="'auto': read only the tasks changed since the parent version "
        "when the project counters prove the change list complete, else a full export; "
        "'full': a full export, the same stable rule (same version as 'auto'); 'scratch': "
        "ignore the parent version (every row deduplicated anew, splits recomputed)."
    )

    def build_config(self) -> dict[str, Any]:
        """Everything that changes the rows: hashed into the version id."""
        return {
            "annotation_policy": self.annotation_policy,
            "response_name": self.response_name,
            "filters": self.filters.model_dump(mode="json"),
            "dedup": self.dedup.model_dump(mode="json"),
            "eval_fraction": self.eval_fraction,
            "split_seed": self.split_seed,
            "system_prompt": self.system_prompt,
            "draft_policy": self.draft_policy,
            "schema": list(formats.COLUMNS),
        }


class BuildReport(BaseModel):
    dataset: str = Field(..., description="The dataset built.")
    version: str | None = Field(None, description="The version (empty: nothing to build).")
    created: bool = Field(False, description="This run committed the version.")
    ref_updated: bool = Field(False, description="This run moved refs/latest.")
    latest: str | None = Field(None, description="refs/latest afterwards.")
    parent: str | None = Field(None, description="The version refs/latest named before.")
    uri: str | None = Field(None, description="s3:// URI of the version's manifest.")
    project_id: int | None = None
    project: str | None = None
    rows: dict[str, int] = Field(default_factory=dict, description="Rows per split.")
    counts: dict[str, Any] = Field(default_factory=dict, description="Figures per stage.")
    bytes_written: int = 0
    bytes_total: int = 0
    mode: str = Field("", description="incremental | full | scratch")
    mode_reason: str = Field("", description="Why this mode (a fallback names its cause).")
    seconds: dict[str, float] = Field(default_factory=dict, description="Seconds per stage.")
    message: str = ""

    def record_mode(self, changes: build.Changes, figures: dict[str, int],
                    seconds: dict[str, float]) -> None:
        self.mode, self.mode_reason, self.seconds = changes.mode, changes.reason, seconds
        # Where an incremental export's seconds went (counters, list, fetch, deleted).
        self.seconds.update({f"export.{k}": v for k, v in changes.export.get("seconds", {}).items()})
        self.counts["changes"] = {**figures, "rows_deleted_in_place":
                                  self.counts.get("commit", {}).get("rows_deleted", 0)}
        if "tasks_listed" in changes.export:  # the incremental export's light listing
            self.counts["changes"]["tasks_listed"] = changes.export["tasks_listed"]

    def record_commit(self, result: version_commit.CommitResult, uri: str) -> None:
        self.version, self.created = result.version, result.created
        self.ref_updated, self.latest, self.parent = result.ref_updated, result.latest, result.parent
        self.rows = self.counts["rows"] = result.rows
        self.counts["commit"] = {
            "shards_written": result.shards_written, "shards_reused": result.shards_reused,
            "rows_deleted": result.rows_deleted,
            "cas_retries": result.cas_retries, "superseded_by": result.superseded_by,
            "parent_missing": len(result.parent_missing), "repaired": len(result.repaired),
        }
        self.bytes_written, self.bytes_total = result.bytes_written, result.bytes_total
        self.uri = uri
        self.message = (
            f"{'created' if result.created else 'unchanged, existing'} version {result.version} "
            f"of {self.dataset}: {result.rows.get('train', 0)} train / "
            f"{result.rows.get('eval', 0)} eval rows; refs/latest -> {result.latest}"
        )


@io_task(name="commit-version")
def commit(s3: S3, params: BuildParams, outcome: build.Outcome, extra: list, *,
           prefix: str, shard_rows: int, source: dict, stats: dict) -> version_commit.CommitResult:
    """Commit the version (and point ``params.tag`` at it)."""
    result = version_commit.commit_version(s3, version_commit.CommitRequest(
        dataset=params.dataset, rows=outcome.rows, config=params.build_config(), source=source,
        stats=stats, prefix=prefix, shard_rows=shard_rows,
        run_id=str(runtime.flow_run.id or ""), code_version=f"sftflow {sftflow.__version__}",
        system_prompt=params.system_prompt, signatures=outcome.signatures, extra_files=extra,
    ))
    if params.tag:
        refs.set_tag(s3, params.dataset, params.tag, result.version, prefix=prefix)
    return result


# -- the flow ----------------------------------------------------------------------------------
@flow(name="build-dataset", flow_run_name="build {params.dataset} from {params.project}", task_runner=ThreadPoolTaskRunner(max_workers=4),
      validate_parameters=True, log_prints=False)
def build_dataset(params: BuildParams) -> BuildReport:
    """Read what changed in Label Studio since the parent version (or everything), filter,
    dedup against the parent, split and commit one dataset version; see the module docstring."""
    logger = get_run_logger()
    clock = build.Stopwatch()
    keys.check_name("dataset", params.dataset)
    import_in_background()  # the pictures' matplotlib, while the export waits on Label Studio
    clients = Clients.for_bucket(params.bucket)
    settings, ls, s3 = clients.settings, clients.labelstudio, clients.s3
    prefix = settings.datasets.prefix
    shard_rows = params.shard_rows or settings.datasets.shard_rows

    project = require_project(ls, params.project)
    report = BuildReport(dataset=params.dataset, project_id=project.id, project=project.title)
    source = build.project_source(settings.labelstudio.url, project)
    plan = build.plan_build(s3, params.dataset, prefix, params.build_config(), mode=params.mode,
                            full_every=settings.datasets.full_every)
    clock.lap("parent")
    with tempfile.TemporaryDirectory(prefix="sftflow-export-") as tmp:
        changes = build.read_changes(
            ls, int(project.id), plan, lambda: _counters(ls, project.id),
            lambda: _full_export(ls, project, params, source, Path(tmp)))
    source.update(mode=changes.mode, mode_reason=changes.reason,
                  since_full=plan.since_full if changes.mode == "incremental" else 0,
                  watermark=changes.watermark or watermark(ls_time(source["snapshot_at"])))
    clock.lap("export")
    parsed = parse_tasks(changes.tasks, params.annotation_policy, params.response_name)
    report.counts["export"] = dict(parsed.counts)
    drafts = figures.draft_figures(parsed.rows, parsed.agreement, params.draft_policy)
    rows, draft_excluded = figures.apply_draft_policy(parsed.rows, params.draft_policy)
    shards = build.chunks(rows, shard_rows) if rows else []
    filtered = [f.result() for f in filter_rows_task.map(shards, unmapped(params.filters))]
    fresh, exclusions, filter_counts = build.merge_filtered(parsed.exclusions + draft_excluded,
                                                            filtered)
    report.counts["filters"] = dict(filter_counts)
    clock.lap("filters")
    texts = build.dedup_texts(fresh, params.dedup)
    fps = [f.result() for f in fingerprint_task.map(build.chunks(texts, shard_rows),
                                                     unmapped(params.dedup))] if fresh else []
    outcome = stable_split_task(quote(plan), quote(changes), quote(fresh), quote(fps),
                                params.dedup, params.eval_fraction, params.split_seed)
    report.counts["dedup"] = build.dedup_counts(outcome.stats)
    clock.lap("dedup")
    if not outcome.rows:
        report.message = build.nothing_to_build(project.title, report.counts)
        logger.warning(report.message)
        create_table_artifact(build.counts_table(report.counts), description=report.message,
                              key=artifact_key("dataset", params.dataset, "counts"))
        return report

    stats = {"export": report.counts["export"], "filters": report.counts["filters"],
             "dedup": outcome.stats, "changes": outcome.figures, "drafts": drafts}
    all_exclusions = build.carried_exclusions(plan, changes) + exclusions + outcome.exclusions
    extra = build.index_files(outcome.tasks, all_exclusions)
    result = commit(s3, params, quote(outcome), quote(extra), prefix=prefix,
                    shard_rows=shard_rows, source=source, stats=stats)
    clock.lap("commit")
    dataset_keys = keys.DatasetKeys.of(prefix, params.dataset)
    report.record_commit(result, s3.uri(dataset_keys.manifest(result.version)))
    report.record_mode(changes, outcome.figures, clock.seconds)
    logger.info(report.message)
    _publish(s3, prefix, params, report, outcome.stats, drafts)
    publish_version_pictures_task(params.dataset, result.version, quote(outcome.rows),
                                  quote(all_exclusions))
    clock.lap("publish")  # artifacts, pictures and the event (report.seconds is clock.seconds)
    return report


def _counters(ls: Any, project_id: int) -> dict[str, int]:
    project = ls.projects.get(id=int(project_id))
    return {k: int(getattr(project, k, 0) or 0) for k in build.PROJECT_COUNTERS}


def _full_export(ls: Any, project: Any, params: BuildParams, source: dict[str, Any],
                 tmp: Path) -> Path:
    """A whole-project export snapshot, downloaded to ``tmp``; its id and time go to ``source``."""
    snapshot = create_snapshot_task(ls, int(project.id), timeout_s=params.export_timeout_s)
    source.update(export_id=snapshot.export_id, snapshot_at=snapshot.created_at)
    path = download_snapshot_task(ls, snapshot, tmp / "export.json")
    if not params.keep_snapshot:
        delete_snapshot(ls, snapshot)
    return path


def _publish(s3: S3, prefix: str, params: BuildParams, report: BuildReport,
             dedup_stats: dict[str, Any], drafts: dict[str, Any]) -> None:
    """The counts and version artifacts; the ``dataset.versioned`` event, once per version
    (deterministic id; recorded under ``refs/announced/``), when it is ``refs/latest``."""
    create_table_artifact(build.counts_table(report.counts),
                          key=artifact_key("dataset", params.dataset, "counts"),
                          description=f"{params.dataset}@{report.version}: kept and dropped")
    create_markdown_artifact(build.version_markdown(report.model_dump(),
                                                    dedup_stats.get("examples", [])),
                             key=artifact_key("dataset", params.dataset, "version"),
                             description=f"dataset version {report.version}")
    create_table_artifact(figures.figures_table(drafts),
                          key=artifact_key("dataset", params.dataset, "drafts"),
                          description=figures.figures_markdown(drafts))
    if not refs.should_announce(s3, params.dataset, report.version, report.latest,
                                prefix=prefix):
        return  # not refs/latest, or already announced: downstream triggers stay quiet
    emit_event(
        event=events.DATASET_VERSIONED,
        resource=events.dataset_resource(params.dataset),
        payload={
            "dataset": params.dataset, "version": report.version, "project_id": report.project_id,
            "rows_train": report.rows.get("train", 0), "rows_eval": report.rows.get("eval", 0),
            "created": report.created,
        },
        id=refs.versioned_event_id(params.dataset, report.version),
    )
    refs.mark_announced(s3, params.dataset, report.version, prefix=prefix)


def build_dataset_on(dask_address: str | None = None, **dask_kwargs: Any):
    """``build_dataset`` with its mapped tasks on a ``dask.distributed`` cluster at
    ``dask_address`` (or a temporary local cluster when None and ``dask_kwargs`` are given)."""
    from prefect_dask import DaskTaskRunner

    runner = (DaskTaskRunner(address=dask_address) if dask_address
              else DaskTaskRunner(cluster_kwargs=dask_kwargs))
    return build_dataset.with_options(task_runner=runner)
