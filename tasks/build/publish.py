"""A committed version made known: the counts and version artifacts, and the
``sftflow.dataset.versioned`` event, once per version.

The event has the version's deterministic id and is recorded under ``refs/announced/`` after
it is emitted, and only when the version is ``refs/latest``: a retry or a rerun after a crash
past the manifest or the ref still announces it, Prefect drops a repeat of the id, and an
unchanged rebuild of an announced version stays quiet.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from sftflow.core import events
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.build.report import BuildReport, counts_table, version_markdown
from sftflow.tasks.runtime.declare import artifact_key, io_task
from sftflow.tasks.versions import refs


def publish_counts(report: BuildReport, description: str | None = None) -> None:
    """The counts table artifact of a build (also of one that made no version)."""
    create_table_artifact(counts_table(report.counts),
                          key=artifact_key("dataset", report.dataset, "counts"),
                          description=description
                          or f"{report.dataset}@{report.version}: kept and dropped")


def publish_version(s3: S3, prefix: str, report: BuildReport,
                    dedup_examples: Iterable[Mapping[str, Any]]) -> bool:
    """The counts and version artifacts; the ``dataset.versioned`` event when the version is
    ``refs/latest`` and was not announced yet. True when this call announced it."""
    publish_counts(report)
    create_markdown_artifact(version_markdown(report.model_dump(), dedup_examples),
                             key=artifact_key("dataset", report.dataset, "version"),
                             description=f"dataset version {report.version}")
    dataset, version = report.dataset, str(report.version)
    if not refs.should_announce(s3, dataset, version, report.latest, prefix=prefix):
        return False  # not refs/latest, or already announced: downstream triggers stay quiet
    emit_event(
        event=events.DATASET_VERSIONED,
        resource=events.dataset_resource(dataset),
        payload={
            "dataset": dataset, "version": version, "project_id": report.project_id,
            "rows_train": report.rows.get("train", 0), "rows_eval": report.rows.get("eval", 0),
            "created": report.created,
        },
        id=refs.versioned_event_id(dataset, version),
    )
    refs.mark_announced(s3, dataset, version, prefix=prefix)
    return True


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
publish_version_task = io_task(name="publish-version")(publish_version)
