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
emitted only when a new version was committed (so the fine-tune trigger does not refire).

Idempotency: the version id is a hash of the rows and the build config, so rebuilding
unchanged annotations writes nothing and returns the existing version. A crash at any point
leaves ``refs/latest`` on a complete version; a rerun completes the commit.

Task runner: the default thread pool, or ``build_dataset_on(dask_address)`` for a
``dask.distributed`` cluster (the mapped filter and fingerprint tasks run on its workers).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, runtime, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

import sftflow
from sftflow.core import events
from sftflow.tasks import dedup as dd
from sftflow.tasks import formats, versioning
from sftflow.tasks._prefect import compute_task, io_task
from sftflow.tasks.clients import Clients
from sftflow.tasks.filters import FilterConfig, filter_shard
from sftflow.tasks.labelstudio import RESPONSE_NAME, require_project
from sftflow.tasks.labelstudio.export import (
    AnnotationPolicy,
    create_snapshot,
    delete_snapshot,
    download_snapshot,
    parse_export_file,
)


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
    dedup: dd.DedupConfig = Field(
        default_factory=dd.DedupConfig, description="Exact and near-duplicate removal."
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
        900.0, gt=0, description="Deadline for Label Studio to finish the export snapshot."
    )
    keep_snapshot: bool = Field(
        False, description="Keep the export snapshot on the Label Studio server afterwards."
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
            "schema": list(formats.COLUMNS),
        }


class BuildReport(BaseModel):
    dataset: str
    version: str | None = None
    created: bool = False
    ref_updated: bool = False
    latest: str | None = None
    parent: str | None = None
    uri: str | None = None
    project_id: int | None = None
    project: str | None = None
    rows: dict[str, int] = Field(default_factory=dict)
    counts: dict[str, Any] = Field(default_factory=dict)
    bytes_written: int = 0
    bytes_total: int = 0
    message: str = ""


# -- compute steps -----------------------------------------------------------------------------
def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)] or [[]]


@compute_task(name="fingerprint-shard")
def fingerprint_shard(texts: list[str], cfg: dd.DedupConfig) -> dd.Fingerprints:
    return dd.fingerprint(texts, cfg)


def split_groups(cluster_ids: np.ndarray, prompt_ids: list[str]) -> np.ndarray:
    """Dedup clusters joined with rows sharing a prompt (policy 'all', or equal prompts with
    different answers), so that neither a near-duplicate nor a prompt straddles train/eval.
    Each group takes the smallest cluster id of its members."""
    parent: dict[Any, Any] = {}

    def find(x: Any) -> Any:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for cid, pid in zip(cluster_ids.tolist(), prompt_ids, strict=True):
        a, b = find(("c", cid)), find(("p", pid))
        if a != b:
            parent[max(a, b)] = min(a, b)  # ("c", ...) < ("p", ...): a cluster stays root
    best: dict[Any, int] = {}
    for cid in cluster_ids.tolist():
        root = find(("c", cid))
        best[root] = min(best.get(root, cid), cid)
    return np.array([best[find(("c", c))] for c in cluster_ids.tolist()], dtype=np.int64)


@compute_task(name="dedup-and-split")
def dedup_and_split(
    rows: list[dict[str, Any]], fps: list[dd.Fingerprints], params: BuildParams
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(final rows with cluster_id/split/row_hash, dedup exclusions, stats).

    A kept row's stored ``cluster_id`` is its own content key (the hash of its normalised
    dedup text), not the cluster's smallest member key: a new near-duplicate that joins the
    cluster later (and loses the keep rule) then changes neither the kept row nor its split,
    so the row's shard is reused by the next version."""
    fp = dd.Fingerprints.concat(fps)
    result = dd.deduplicate(rows, params.dedup, fingerprints=fp)
    keep = result.keep
    kept_idx = np.flatnonzero(keep)
    rep_key = fp.keys[kept_idx]
    rep_of_cluster = dict(zip(result.cluster_id[kept_idx].tolist(), rep_key.tolist(),
                              strict=True))
    groups = split_groups(rep_key, [rows[i]["prompt_id"] for i in kept_idx])
    is_eval = dd.split_by_cluster(groups, params.eval_fraction, params.split_seed)
    leak_clusters = dd.leakage(result.cluster_id[kept_idx], is_eval)
    leak_prompts = dd.leakage(
        np.array([hash(rows[i]["prompt_id"]) for i in kept_idx], dtype=np.int64), is_eval
    ) if len(kept_idx) else 0
    if leak_clusters or leak_prompts:  # impossible by construction; never publish a leak
        raise RuntimeError(f"split leakage: {leak_clusters} clusters, {leak_prompts} prompts")
    final = []
    for i, key, ev in zip(kept_idx.tolist(), rep_key.tolist(), is_eval.tolist(), strict=True):
        row = {c: rows[i][c] for c in formats.COLUMNS if c in rows[i]}
        row["cluster_id"] = _hex(key)
        row["split"] = "eval" if ev else "train"
        row["row_hash"] = formats.row_hash(row)
        final.append(row)
    exclusions = [
        # The kept twin (same cluster_id) is in the data: no text copied, the file stays small.
        {"stage": "dedup", "reason": "duplicate", "task_id": rows[i]["task_id"],
         "annotation_id": rows[i]["annotation_id"],
         "cluster_id": _hex(rep_of_cluster[int(result.cluster_id[i])])}
        for i in np.flatnonzero(~keep).tolist()
    ]
    stats = {
        **result.summary(),
        "examples": result.examples,
        "split_groups": len(np.unique(groups)) if len(groups) else 0,
        "leakage_clusters": leak_clusters,
        "leakage_prompts": leak_prompts,
    }
    return final, exclusions, stats


def _hex(key: int) -> str:
    return f"{int(key) & 0xFFFFFFFFFFFFFFFF:016x}"


@io_task(name="commit-version")
def commit(s3: Any, params: BuildParams, rows: list[dict], *, prefix: str, shard_rows: int,
           source: dict, stats: dict, exclusions: list[dict]) -> versioning.CommitResult:
    result = versioning.commit_version(
        s3, params.dataset, rows, config=params.build_config(), source=source, stats=stats,
        exclusions=exclusions, prefix=prefix, shard_rows=shard_rows,
        run_id=str(runtime.flow_run.id or ""), code_version=f"sftflow {sftflow.__version__}",
        system_prompt=params.system_prompt,
    )
    if params.tag:
        versioning.set_tag(s3, params.dataset, params.tag, result.version, prefix=prefix)
    return result


# -- the flow ----------------------------------------------------------------------------------
def _counts_table(counts: dict[str, Any]) -> list[dict[str, Any]]:
    table = []
    for stage in ("export", "filters", "dedup"):
        for key, value in sorted((counts.get(stage) or {}).items()):
            if isinstance(value, int | float):
                table.append({"stage": stage, "count": key, "value": value})
    for split, n in (counts.get("rows") or {}).items():
        table.append({"stage": "version", "count": f"rows_{split}", "value": n})
    return table


@flow(name="build-dataset", task_runner=ThreadPoolTaskRunner(max_workers=4),
      validate_parameters=True, log_prints=False)
def build_dataset(params: BuildParams) -> BuildReport:
    """Export, filter, dedup, split and commit one dataset version; see the module docstring."""
    logger = get_run_logger()
    versioning.check_name("dataset", params.dataset)
    clients = Clients.for_bucket(params.bucket)
    settings = clients.settings
    prefix = settings.datasets.prefix
    shard_rows = params.shard_rows or settings.datasets.shard_rows
    ls, s3 = clients.labelstudio, clients.s3

    project = require_project(ls, params.project)
    report = BuildReport(dataset=params.dataset, project_id=project.id, project=project.title)
    source = {
        "labelstudio_url": settings.labelstudio.url,
        "project_id": int(project.id),
        "project_title": project.title,
        **{k: int(getattr(project, k, 0) or 0) for k in (
            "task_number", "num_tasks_with_annotations", "total_annotations_number",
            "finished_task_number", "skipped_annotations_number")},
    }

    snapshot = create_snapshot(ls, int(project.id), timeout_s=params.export_timeout_s)
    source.update(export_id=snapshot.export_id, snapshot_at=snapshot.created_at)
    with tempfile.TemporaryDirectory(prefix="sftflow-export-") as tmp:
        path = download_snapshot(ls, snapshot, Path(tmp) / "export.json")
        if not params.keep_snapshot:
            delete_snapshot(ls, snapshot)
        parsed = parse_export_file(path, params.annotation_policy, params.response_name)
    export_counts = dict(parsed.counts)
    report.counts["export"] = export_counts
    logger.info("export %s of project %s: %s", snapshot.export_id, project.id, export_counts)

    rows = parsed.rows
    exclusions = list(parsed.exclusions)
    del parsed
    filter_counts: Counter = Counter()
    if rows:
        futures = filter_shard.map(_chunks(rows, shard_rows), unmapped(params.filters))
        rows = []
        for fut in futures:
            res = fut.result()
            rows += res.kept
            exclusions += res.excluded
            filter_counts.update(res.counts)
    report.counts["filters"] = dict(filter_counts)

    if not rows:
        report.message = (
            f"no version made: project {project.title!r} has no usable annotations "
            f"({export_counts.get('annotations', 0)} annotations exported, "
            f"{filter_counts.get('kept', 0)} rows passed the filters)"
        )
        logger.warning(report.message)
        create_table_artifact(_counts_table(report.counts), key=_key(params.dataset, "counts"),
                              description=report.message)
        return report

    texts = [dd.dedup_text(r["prompt"], r["completion"], params.dedup) for r in rows]
    fps = [f.result() for f in fingerprint_shard.map(_chunks(texts, shard_rows),
                                                     unmapped(params.dedup))]
    del texts
    final, dedup_excl, dedup_stats = dedup_and_split(rows, fps, params)
    exclusions += dedup_excl
    report.counts["dedup"] = {k: v for k, v in dedup_stats.items() if k != "examples"} | {
        **{f"dropped:{k}": v for k, v in dedup_stats["dropped"].items()}}
    report.counts["dedup"].pop("dropped", None)
    stats = {"export": export_counts, "filters": dict(filter_counts), "dedup": dedup_stats}

    result = commit(s3, params, final, prefix=prefix, shard_rows=shard_rows, source=source,
                    stats=stats, exclusions=exclusions)
    root = versioning.dataset_root(prefix, params.dataset)
    report.version, report.created = result.version, result.created
    report.ref_updated, report.latest, report.parent = (
        result.ref_updated, result.latest, result.parent)
    report.rows = result.rows
    report.counts["rows"] = result.rows
    report.counts["commit"] = {
        "shards_written": result.shards_written, "shards_reused": result.shards_reused,
        "cas_retries": result.cas_retries, "superseded_by": result.superseded_by,
    }
    report.bytes_written, report.bytes_total = result.bytes_written, result.bytes_total
    report.uri = s3.uri(f"{root}/versions/{result.version}/manifest.json")
    report.message = (
        f"{'created' if result.created else 'unchanged, existing'} version {result.version} of "
        f"{params.dataset}: {result.rows.get('train', 0)} train / {result.rows.get('eval', 0)} "
        f"eval rows; refs/latest -> {result.latest}"
    )
    logger.info(report.message)
    _publish(params, report, dedup_stats)
    return report


def _key(dataset: str, what: str) -> str:
    return f"dataset-{dataset}-{what}".lower().replace("_", "-").replace(".", "-")


def _publish(params: BuildParams, report: BuildReport, dedup_stats: dict[str, Any]) -> None:
    create_table_artifact(_counts_table(report.counts), key=_key(params.dataset, "counts"),
                          description=f"{params.dataset}@{report.version}: kept and dropped")
    lines = [
        f"# {params.dataset} @ `{report.version}`",
        "",
        f"Manifest: `{report.uri}`  ",
        f"Created: {report.created}; refs/latest: `{report.latest}`; parent: `{report.parent}`",
        "",
        f"Rows: {report.rows}. Bytes written {report.bytes_written:,} of {report.bytes_total:,}.",
        "",
        "## Dedup examples (clusters removed)",
    ]
    for ex in dedup_stats.get("examples", []):
        lines += ["", (f"- cluster `{ex['cluster_id']}` ({ex['size']} rows), kept: "
                      f"{ex['kept']['text']!r}")]
        lines += [f"  - dropped ({d['reason']}): {d['text']!r}" for d in ex["dropped"]]
    create_markdown_artifact("\n".join(lines), key=_key(params.dataset, "version"),
                             description=f"dataset version {report.version}")
    if not report.created:
        return  # an unchanged rebuild is not a new version: downstream triggers stay quiet
    emit_event(
        event=events.DATASET_VERSIONED,
        resource=events.dataset_resource(params.dataset),
        payload={
            "dataset": params.dataset, "version": report.version, "project_id": report.project_id,
            "rows_train": report.rows.get("train", 0), "rows_eval": report.rows.get("eval", 0),
            "created": report.created,
        },
    )


def build_dataset_on(dask_address: str | None = None, **dask_kwargs: Any):
    """``build_dataset`` with its mapped tasks on a ``dask.distributed`` cluster at
    ``dask_address`` (or a temporary local cluster when None and ``dask_kwargs`` are given)."""
    from prefect_dask import DaskTaskRunner

    runner = (DaskTaskRunner(address=dask_address) if dask_address
              else DaskTaskRunner(cluster_kwargs=dask_kwargs))
    return build_dataset.with_options(task_runner=runner)
