"""Flow ``build_dataset``: Label Studio annotations -> an immutable dataset version in S3.

Triggered by: ``sftflow build --project P --dataset D``, the pipeline flow, or a deployment
run (e.g. after ``wait_for_annotations``).

Inputs: ``BuildParams`` (project, dataset, annotation policy, filters, dedup, eval fraction).

Stages (each a call into ``tasks/build/`` or ``tasks/versions/``): plan (the parent version
and the mode) -> the changed tasks (incremental export proven against the project counters,
else a full export snapshot) -> parse into rows -> the draft policy and the filters + PII/secret
scan (mapped over shards) -> MinHash fingerprints (mapped over shards) -> dedup against the
parent's rows and the cluster-aware split -> commit (content-addressed shards, JSONL formats,
card, exclusions, task index, manifest, ``refs/latest`` CAS) -> artifacts, pictures and the
event.

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

Concurrency: the flow holds the dataset's build lock (``tasks/versions/locks.py``: the lease
record ``<bucket>/_sftflow/locks/sftflow-build-dataset-<dataset>.json``, renewed while it runs)
from its plan to its event, whoever starts it (the CLI, the pipeline, a deployment run on any
work pool), so builds of one dataset never overlap. The manifest's ``source`` records the
watermark of what the build read from Label Studio (incremental and full builds alike), and
``refs/latest`` never moves to a version read earlier than the one it names
(``refs.advance_latest``): a build that lost its lock while frozen and commits late is
reported as not latest (``superseded_by``) and is not announced.

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
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from pydantic import BaseModel, Field

import sftflow
from sftflow.tasks.adapters.clients import Clients
from sftflow.tasks.adapters.labelstudio import RESPONSE_NAME, require_project
from sftflow.tasks.build.changes import (
    carried_exclusions,
    changes_from_snapshot_task,
    read_changes_task,
)
from sftflow.tasks.build.delta import ls_time, watermark
from sftflow.tasks.build.draft_return import publish_draft_return_task
from sftflow.tasks.build.export import (
    AnnotationPolicy,
    create_snapshot_task,
    delete_snapshot,
    download_snapshot_task,
    export_deadline,
    parse_tasks,
)
from sftflow.tasks.build.filters import (
    DEFAULT_DRAFT_POLICY,
    DraftPolicy,
    FilterConfig,
    apply_draft_policy,
    filter_rows_task,
)
from sftflow.tasks.build.pictures import publish_version_pictures_task
from sftflow.tasks.build.plan import plan_build_task
from sftflow.tasks.build.publish import publish_counts, publish_version_task
from sftflow.tasks.build.report import (
    BuildReport,
    dedup_counts,
    nothing_to_build,
    project_source,
)
from sftflow.tasks.build.shards import chunks, dedup_texts, fingerprint_task, merge_filtered
from sftflow.tasks.build.split import index_files, stable_split_task
from sftflow.tasks.build.warm import warm_in_background
from sftflow.tasks.dedup import DedupConfig
from sftflow.tasks.drafts.figures import draft_figures, publish_figures_task
from sftflow.tasks.runtime.progress import PhaseTimer
from sftflow.tasks.versions import formats, keys
from sftflow.tasks.versions.commit import CommitRequest, commit_version_task
from sftflow.tasks.versions.locks import build_lock
from sftflow.tasks.versions.refs import set_tag_task


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
    export_timeout_s: float | None = Field(
        None, gt=0, description="One deadline for the export snapshot: its creation (retries "
        "included) and Label Studio finishing it (empty: from the project's size, 900 s up to "
        "90k tasks and 10 ms a task above, at most 6 h; see tasks/build/export.py)."
    )
    keep_snapshot: bool = Field(
        False, description="Keep the export snapshot on the Label Studio server afterwards."
    )
    draft_policy: DraftPolicy = Field(
        DEFAULT_DRAFT_POLICY,
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
    lock_timeout_s: float = Field(
        3600.0, gt=0, description="Wait this long for the dataset's build lock while another "
        "build of the dataset holds it."
    )
    lock_lease_s: float | None = Field(
        None, ge=1, description="Lease of the dataset's build lock, renewed every third of it "
        "while the build runs (empty: the setting locks.lease_s, 60 s unless configured).",
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


# -- the flow ----------------------------------------------------------------------------------
@flow(name="build-dataset", flow_run_name="build {params.dataset} from {params.project}",
      task_runner=ThreadPoolTaskRunner(max_workers=4), validate_parameters=True, log_prints=False)
def build_dataset(params: BuildParams) -> BuildReport:
    """Read what changed in Label Studio since the parent version (or everything), filter,
    dedup against the parent, split and commit one dataset version, holding the dataset's
    build lock throughout; see the module docstring."""
    keys.check_name("dataset", params.dataset)
    clients = Clients.for_bucket(params.bucket)
    lock = build_lock(clients.s3, params.dataset,
                      lease_s=params.lock_lease_s or clients.settings.locks.lease_s)
    with lock.held(params.lock_timeout_s):
        return _build(params, clients)


def _build(params: BuildParams, clients: Clients) -> BuildReport:
    """The build's stages, run while the flow holds the dataset's build lock."""
    clock = PhaseTimer()
    settings, ls, s3 = clients.settings, clients.labelstudio, clients.s3
    prefix, shard_rows = settings.datasets.prefix, params.shard_rows or settings.datasets.shard_rows

    project = require_project(ls, params.project, counters=False)
    report = BuildReport(dataset=params.dataset, project_id=project.id, project=project.title)
    plan = plan_build_task(s3, params.dataset, prefix, params.build_config(), mode=params.mode,
                           full_every=settings.datasets.full_every)
    clock.lap("parent")
    warm_in_background()  # matplotlib and the dedup kernels, while the export waits
    with tempfile.TemporaryDirectory(prefix="sftflow-export-") as tmp:
        changes, source = _read_changes(params, ls, settings.labelstudio.url, project, plan,
                                        Path(tmp))
        clock.lap("export")
        # a full export's tasks stream from its snapshot, which must still be on disk here
        fresh, exclusions, drafts = _parse_and_filter(changes, params, report, shard_rows)
    clock.lap("filters")
    outcome = _dedup_and_split(plan, changes, fresh, params, shard_rows)
    del fresh  # the outcome holds its own copies of the rows it keeps: these can go now
    report.counts["dedup"] = dedup_counts(outcome.stats)
    clock.lap("dedup")
    if not outcome.rows:
        report.message = nothing_to_build(project.title, report.counts)
        get_run_logger().warning(report.message)
        publish_counts(report, description=report.message)
        return report

    all_exclusions = carried_exclusions(plan, changes) + exclusions + outcome.exclusions
    request = CommitRequest(
        dataset=params.dataset, rows=outcome.rows, config=params.build_config(), source=source,
        stats={"export": report.counts["export"], "filters": report.counts["filters"],
               "dedup": outcome.stats, "changes": outcome.figures, "drafts": drafts},
        prefix=prefix, shard_rows=shard_rows, run_id=str(runtime.flow_run.id or ""),
        code_version=f"sftflow {sftflow.__version__}", system_prompt=params.system_prompt,
        signatures=outcome.signatures,
        extra_files=index_files(plan, changes, outcome.tasks, all_exclusions))
    result = commit_version_task(s3, quote(request))
    if params.tag:
        set_tag_task(s3, params.dataset, params.tag, result.version, prefix=prefix)
    clock.lap("commit")
    report.record_commit(result, s3.uri(keys.DatasetKeys.of(prefix, params.dataset)
                                        .manifest(result.version)))
    report.record_mode(changes, outcome.figures)
    report.record_seconds(clock.seconds(), changes)
    get_run_logger().info(report.message)
    publish_version_task(s3, prefix, quote(report), outcome.stats.get("examples", []))
    publish_figures_task(params.dataset, drafts)
    publish_draft_return_task(params.dataset, result.version, drafts.get("return"))
    publish_version_pictures_task(params.dataset, result.version, quote(outcome.rows),
                                  quote(all_exclusions))
    clock.lap("publish")  # artifacts, pictures and the event
    report.record_seconds(clock.seconds(), changes)
    return report


def _parse_and_filter(changes: Any, params: BuildParams, report: BuildReport,
                      shard_rows: int) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """The changed tasks parsed into rows, the draft policy and the filters applied (mapped
    over shards): the rows left, every exclusion, and the draft figures. What is only needed
    on the way (the parsed export, the shards) is freed on return."""
    parsed = parse_tasks(changes.iter_tasks(), params.annotation_policy, params.response_name)
    report.counts["export"] = dict(parsed.counts)
    drafts = draft_figures(parsed.rows, parsed.agreement, params.draft_policy,
                           lead_times=parsed.lead_times)
    report.draft_return = drafts.get("return")
    rows, draft_excluded = apply_draft_policy(parsed.rows, params.draft_policy)
    shards = chunks(rows, shard_rows) if rows else []
    filtered = [f.result() for f in filter_rows_task.map(shards, unmapped(params.filters))]
    fresh, exclusions, filter_counts = merge_filtered(parsed.exclusions + draft_excluded, filtered)
    report.counts["filters"] = dict(filter_counts)
    return fresh, exclusions, drafts


def _dedup_and_split(plan: Any, changes: Any, fresh: list[Any], params: BuildParams,
                     shard_rows: int) -> Any:
    """MinHash fingerprints of the fresh rows (mapped over shards), then the stable dedup
    against the parent and the split; the dedup texts and fingerprints are freed on return."""
    texts = chunks(dedup_texts(fresh, params.dedup), shard_rows)
    fps = [f.result() for f in fingerprint_task.map(texts, unmapped(params.dedup))] if fresh else []
    return stable_split_task(quote(plan), quote(changes), quote(fresh), quote(fps),
                             params.dedup, params.eval_fraction, params.split_seed)


def _read_changes(params: BuildParams, ls: Any, ls_url: str, project: Any, plan: Any,
                  tmp: Path) -> tuple[Any, dict[str, Any]]:
    """The changes since the parent (incremental), or a full export snapshot downloaded into
    ``tmp`` (``Changes.snapshot``); and the version's ``source`` record."""
    changes = read_changes_task(ls, int(project.id), quote(plan))
    source = project_source(ls_url, project, changes.counters)
    if changes.needs_export:
        deadline = params.export_timeout_s or export_deadline(
            int(changes.counters.get("task_number") or 0))
        snapshot = create_snapshot_task(ls, int(project.id), timeout_s=deadline)
        source.update(export_id=snapshot.export_id, snapshot_at=snapshot.created_at)
        path = download_snapshot_task(ls, snapshot, tmp / "export.json")
        if not params.keep_snapshot:
            delete_snapshot(ls, snapshot)
        changes = changes_from_snapshot_task(quote(plan), path, changes.reason)
    source.update(mode=changes.mode, mode_reason=changes.reason,
                  since_full=plan.since_full if changes.mode == "incremental" else 0,
                  watermark=changes.watermark or watermark(ls_time(source["snapshot_at"])))
    return changes, source


def build_dataset_on(dask_address: str | None = None, **dask_kwargs: Any):
    """``build_dataset`` with its mapped tasks on a ``dask.distributed`` cluster at
    ``dask_address`` (or a temporary local cluster when None and ``dask_kwargs`` are given)."""
    from prefect_dask import DaskTaskRunner

    runner = (DaskTaskRunner(address=dask_address) if dask_address
              else DaskTaskRunner(cluster_kwargs=dask_kwargs))
    return build_dataset.with_options(task_runner=runner)
