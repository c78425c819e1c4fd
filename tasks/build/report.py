"""What a build reports: the ``BuildReport`` record (the flow's result, ``--json``), the
counts table and the version's markdown artifact, and the manifest's ``source`` record.
Pure: no services.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, Field

from sftflow.core.urls import redact_url
from sftflow.tasks.adapters.labelstudio import PROJECT_COUNTERS
from sftflow.tasks.build.changes import Changes
from sftflow.tasks.versions import formats
from sftflow.tasks.versions.commit import CommitResult


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
    mode_reason: str = Field("", description="Why this mode: an incremental build states its "
                             "proof (the listing whole, the counters reconciled); a fallback to "
                             "a full export names what could not be proven.")
    seconds: dict[str, float] = Field(default_factory=dict, description="Seconds per stage.")
    draft_return: dict[str, Any] | None = Field(
        None, description="Seconds of annotator time drafts saved, per drafting model and per "
        "annotator, from Label Studio's lead_time (draft_return.py; also the manifest's "
        "stats.drafts.return).")
    message: str = ""

    def record_mode(self, changes: Changes, figures: dict[str, int]) -> None:
        self.mode, self.mode_reason = changes.mode, changes.reason
        self.counts["changes"] = {**figures, "rows_deleted_in_place":
                                  self.counts.get("commit", {}).get("rows_deleted", 0)}
        for key in ("tasks_listed", "pages_listed"):  # the incremental export's light listing
            if key in changes.export:
                self.counts["changes"][key] = changes.export[key]

    def record_seconds(self, seconds: dict[str, float], changes: Changes) -> None:
        """Seconds per stage, and where an incremental export's went (counters, list, fetch,
        deleted) as ``export.<step>``."""
        self.seconds = {**seconds, **{f"export.{k}": v
                                      for k, v in changes.export.get("seconds", {}).items()}}

    def record_commit(self, result: CommitResult, uri: str) -> None:
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


def project_source(labelstudio_url: str, project: Any, counters: Mapping[str, int]) -> dict[str, Any]:
    """The manifest's ``source`` record of a Label Studio project and its counters read
    before the export; the URL without credentials (``redact_url``): nothing stored holds a
    password or token."""
    return {
        "labelstudio_url": redact_url(labelstudio_url),
        "project_id": int(project.id),
        "project_title": project.title,
        **{k: int(counters.get(k, 0) or 0) for k in PROJECT_COUNTERS},
    }


def dedup_counts(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The dedup figures of the build report: the summary less its examples, with each drop
    reason as ``dropped:<reason>``."""
    return {k: v for k, v in stats.items() if k not in ("examples", "dropped")} | {
        f"dropped:{k}": v for k, v in stats["dropped"].items()}


def counts_table(counts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of the build's counts artifact: stage, count, value."""
    table = []
    for stage in ("export", "filters", "dedup"):
        for key, value in sorted((counts.get(stage) or {}).items()):
            if isinstance(value, int | float):
                table.append({"stage": stage, "count": key, "value": value})
    for split, n in (counts.get("rows") or {}).items():
        table.append({"stage": "version", "count": f"rows_{split}", "value": n})
    return table


def nothing_to_build(project_title: str, counts: Mapping[str, Any]) -> str:
    return (
        f"no version made: project {project_title!r} has no usable annotations "
        f"({(counts.get('export') or {}).get('annotations', 0)} annotations exported, "
        f"{(counts.get('filters') or {}).get('kept', 0)} rows passed the filters)"
    )


def version_markdown(report: Mapping[str, Any], examples: Iterable[Mapping[str, Any]]) -> str:
    """The version artifact: where the manifest is, rows, bytes, the seconds drafts saved
    (when some annotation started from one), and dedup examples. ``report`` holds the build
    report's fields."""
    r = report
    lines = [
        f"# {r['dataset']} @ `{r['version']}`",
        "",
        f"Manifest: `{r['uri']}`  ",
        f"Created: {r['created']}; refs/latest: `{r['latest']}`; parent: `{r['parent']}`",
        "",
        f"Rows: {r['rows']}. Bytes written {r['bytes_written']:,} of {r['bytes_total']:,}.",
        "",
    ]
    if (r.get("draft_return") or {}).get("models"):  # some annotation started from a draft
        lines += ["## Draft return", "", *formats.draft_return_section(r["draft_return"])]
    lines += ["## Dedup examples (clusters removed)"]
    for ex in examples:
        lines += ["", (f"- cluster `{ex['cluster_id']}` ({ex['size']} rows), kept: "
                      f"{ex['kept']['text']!r}")]
        lines += [f"  - dropped ({d['reason']}): {d['text']!r}" for d in ex["dropped"]]
    return "\n".join(lines)
