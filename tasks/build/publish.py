"""A committed version made known: the counts and version artifacts, and the
``sftflow.dataset.versioned`` event, once per version.

The event has the version's deterministic id and is recorded under ``refs/announced/`` only
once the Prefect server has accepted it: sent through an awaited events client, then read back
from the API (by id and resource) within ``confirm_s``. An event that was refused, lost or not
readable in time leaves the version unannounced (``publish_version`` returns False, with a
warning): a rerun, or the scheduled reconciliation (``flows/check_annotations.py`` calls
:func:`announce`), announces it later. Only when the version is ``refs/latest``: a retry or a
rerun after a crash past the manifest or the ref still announces it, Prefect drops a repeat of
the id, and an unchanged rebuild of an announced version stays quiet.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from sftflow.core import events
from sftflow.tasks.adapters.prefect import event_stored, send_event
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.build.report import BuildReport, counts_table, version_markdown
from sftflow.tasks.runtime.declare import artifact_key, io_task
from sftflow.tasks.runtime.polling import Backoff, wait_until
from sftflow.tasks.versions import refs
from sftflow.tasks.versions.read import load_manifest

#: How long an announcement waits for the server to return its event (the event persister
#: writes in batches, every few seconds).
CONFIRM_S = 60.0

_log = logging.getLogger(__name__)


def publish_counts(report: BuildReport, description: str | None = None) -> None:
    """The counts table artifact of a build (also of one that made no version)."""
    create_table_artifact(counts_table(report.counts),
                          key=artifact_key("dataset", report.dataset, "counts"),
                          description=description
                          or f"{report.dataset}@{report.version}: kept and dropped")


def announce(s3: S3, prefix: str, dataset: str, version: str, payload: Mapping[str, Any], *,
             confirm_s: float = CONFIRM_S) -> bool:
    """Send ``version``'s ``dataset.versioned`` event and mark it announced once the Prefect
    API returns it. False (nothing marked) when it could not be sent or was not readable
    within ``confirm_s``: a later call sends the same id again (Prefect drops a repeat)."""
    event_id = refs.versioned_event_id(dataset, version)
    resource = events.dataset_resource(dataset)
    try:
        send_event(events.DATASET_VERSIONED, resource, dict(payload), event_id)
    except Exception as err:  # noqa: BLE001 - not delivered: stays unannounced, for a rerun
        _log.warning("%s@%s: dataset.versioned not sent (%s: %s); not marked announced",
                     dataset, version, type(err).__name__, err)
        return False
    if not wait_until(lambda: event_stored(event_id, resource["prefect.resource.id"]),
                      timeout_s=confirm_s, backoff=Backoff(0.1, 0.3)):
        _log.warning("%s@%s: dataset.versioned %s not readable from the Prefect API within "
                     "%.0f s; not marked announced", dataset, version, event_id, confirm_s)
        return False
    refs.mark_announced(s3, dataset, version, prefix=prefix)
    return True


def publish_version(s3: S3, prefix: str, report: BuildReport,
                    dedup_examples: Iterable[Mapping[str, Any]], *,
                    confirm_s: float = CONFIRM_S) -> bool:
    """The counts and version artifacts; the ``dataset.versioned`` event when the version is
    ``refs/latest`` and was not announced yet. True when this call announced it (the server
    accepted the event)."""
    publish_counts(report)
    create_markdown_artifact(version_markdown(report.model_dump(), dedup_examples),
                             key=artifact_key("dataset", report.dataset, "version"),
                             description=f"dataset version {report.version}")
    dataset, version = report.dataset, str(report.version)
    if not refs.should_announce(s3, dataset, version, report.latest, prefix=prefix):
        return False  # not refs/latest, or already announced: downstream triggers stay quiet
    return announce(s3, prefix, dataset, version, {
        "dataset": dataset, "version": version, "project_id": report.project_id,
        "rows_train": report.rows.get("train", 0), "rows_eval": report.rows.get("eval", 0),
        "created": report.created,
    }, confirm_s=confirm_s)


def announce_latest(s3: S3, prefix: str, dataset: str, *,
                    confirm_s: float = CONFIRM_S) -> str | None:
    """The reconciliation's announcement: ``refs/latest`` when its event was never confirmed
    (a build whose event the server did not accept, or a crash before it was sent), sent now
    with the payload its manifest gives. The version announced by this call, else None."""
    latest = refs.latest_version(s3, dataset, prefix=prefix)
    if latest is None or not refs.should_announce(s3, dataset, latest, latest, prefix=prefix):
        return None
    manifest = load_manifest(s3, dataset, latest, verify=False, prefix=prefix)
    payload = {"dataset": dataset, "version": latest,
               "project_id": manifest.source.get("project_id"),
               "rows_train": manifest.rows.get("train", 0),
               "rows_eval": manifest.rows.get("eval", 0), "created": False}
    return latest if announce(s3, prefix, dataset, latest, payload, confirm_s=confirm_s) else None


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
publish_version_task = io_task(name="publish-version")(publish_version)
announce_latest_task = io_task(name="announce-latest")(announce_latest)
