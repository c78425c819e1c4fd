"""Flow ``ingest_prompts``: prompt files in S3 -> tasks in a Label Studio project, exactly once.

Triggered by: ``sftflow ingest s3://bucket/prefix --project NAME``, a deployment run (e.g. on
the ``sftflow.prompts.arrived`` event), or the pipeline flow.

Inputs: ``IngestParams`` -- every JSONL / JSON array / CSV / TSV / Parquet object (optionally
gzip-compressed) under ``source``; the prompt comes from ``fields.prompt_field`` (optionally
joined with ``fields.input_field``).

Outputs:
- one Label Studio task per new prompt: ``data = {"prompt", "prompt_id", "source",
  "source_etag", "source_row", "ingest_batch", ...fields.keep_fields}`` in a project with the
  Supervised LLM Fine-tuning config (created when missing);
- ``s3://<source bucket>/<state_prefix>/ingest/project-<id>/``: the ledger (prompt_ids per
  confirmed batch, processed objects by key + ETag);
- ``s3://<source bucket>/<state_prefix>/ingest/project-<id>/signatures/``: the MinHash signature
  index of the project's prompts (``tasks.ingest.index``);
- ``s3://<source bucket>/<state_prefix>/quarantine/``: rejected records and files, with reasons
  (near-duplicate prompts under ``near_duplicates/``, with the existing task's id);
- artifacts: a progress bar while importing, a table of counts and throughput;
- event ``sftflow.prompts.ingested`` with the counts.

Idempotency: a prompt whose ``prompt_id`` (sha256 of the normalised text) is already in the
project is never imported again; objects already processed (same key and ETag) are not read
again. Runs on the same project (from one source bucket) are serialised by a leased lock record
in S3, ``<state_prefix>/locks/sftflow-ingest-project-<id>.json``, whose fencing token every
ledger write checks. An import request with an unknown outcome, or left pending by a crash, is
resent only after it has certainly ended on the server (all its tasks found, or
``import_doubt_s`` past its sending); a final check compares the project's task count with the
ledger and rescans if they disagree, removing duplicate tasks: never one with work on it (an
annotation, a skip, a prediction such as a model draft, an annotator's draft), checked by Label
Studio in the delete request itself; of a duplicate pair the one with work stays.
Every input record ends as exactly one of imported / duplicate / quarantined (a prompt whose id is
already in the project is a duplicate; one that near-duplicates a prompt of the project or of the
run is quarantined as ``near_duplicate_prompt``).
"""

from __future__ import annotations

import contextlib
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event
from pydantic import BaseModel, Field, field_validator

from sftflow.core.errors import ConfigError
from sftflow.core.events import PROMPTS_INGESTED, project_resource
from sftflow.core.settings import get_settings
from sftflow.tasks.adapters.clients import Clients
from sftflow.tasks.adapters.s3 import parse_s3_uri
from sftflow.tasks.ingest.importer import ImportTotals, ProjectImporter
from sftflow.tasks.ingest.index import prompt_config
from sftflow.tasks.ingest.intake import IntakeTally, Selection, select_objects
from sftflow.tasks.ingest.ledger import Ledger, bucket_exists
from sftflow.tasks.ingest.parse import read_prompt_file_task
from sftflow.tasks.ingest.projects import ensure_project_task
from sftflow.tasks.ingest.prompts import FieldMapping, Limits
from sftflow.tasks.runtime.declare import artifact_key
from sftflow.tasks.runtime.progress import PhaseTimer, ProgressBar
from sftflow.tasks.versions.locks import ingest_lock_name, s3_lock


class IngestParams(BaseModel):
    """Parameters of one ingest run (rendered as a form in the Prefect UI)."""

    source: str = Field(..., description="Where the prompt files are: s3://bucket/prefix")
    project: str = Field(
        ..., min_length=1, pattern=r"\S",
        description="Label Studio project title or numeric id; a missing title is created.",
    )
    fields: FieldMapping = Field(default_factory=FieldMapping, description="Where the prompt is.")
    limits: Limits = Field(default_factory=Limits, description="Size limits (beyond: quarantine).")
    batch_size: int = Field(10_000, ge=1, le=100_000, description="Tasks per import request.")
    max_files: int | None = Field(None, ge=1, description="Process at most this many new objects.")
    max_records: int | None = Field(
        None, ge=1, description="Stop after this many records (the rest waits for the next run)."
    )
    create_project: bool = Field(True, description="Create the project when the title is missing.")
    state_prefix: str = Field(
        "_sftflow", description="Prefix in the source bucket for the ledger and the quarantine."
    )
    lock_timeout_s: float = Field(
        900, gt=0, description="How long to wait for another ingest of the same project."
    )
    lock_lease_s: float | None = Field(
        None, ge=1, description="Lease of the project's ingest lock, renewed every third of it "
        "while the run works: a killed run's lock is taken over this long after its last "
        "renewal (empty: the setting locks.lease_s, 60 s unless configured).",
    )
    import_timeout_s: float | None = Field(
        None, gt=0, description="HTTP timeout per import request (default: Label Studio settings)."
    )
    near_duplicates: bool = Field(
        True, description="Quarantine a new prompt that near-duplicates a prompt already in the "
        "project or earlier in the run (near_duplicate_prompt, with the existing task id).",
    )
    near_duplicate_threshold: float = Field(
        1.0, gt=0.0, le=1.0,
        description="Estimated Jaccard similarity of word 5-gram sets (punctuation ignored, "
        "digits kept) at or above which a prompt is a near-duplicate. The default, 1.0, stops "
        "prompts retyped with other punctuation (and long prompts equal but for a word or two); "
        "lower values also stop edited prompts but, on prompts sharing long contexts, other "
        "instructions on the same text (README: near-duplicate prompts).",
    )
    import_doubt_s: float = Field(
        300, gt=0,
        description="The longest an import request can run on the Label Studio server (its "
        "worker or gateway timeout). A request whose outcome is unknown is sent again only when "
        "its tasks are not in the project this long after it was sent.",
    )

    @field_validator("source")
    @classmethod
    def _s3_uri(cls, v: str) -> str:
        parse_s3_uri(v)
        return v


class IngestReport(BaseModel):
    """What one ingest run did: the flow's result, the CLI's ``--json`` and the table artifact."""

    source: str
    project: str
    project_id: int
    ledger: str
    files_listed: int = 0
    files_unchanged: int = 0
    files_read: int = 0
    files_quarantined: int = 0
    files_failed: int = 0  # unreadable after retries (e.g. access denied); not in the ledger
    records: int = 0
    imported: int = 0
    duplicate: int = 0
    quarantined: int = 0
    reasons: dict[str, int] = Field(default_factory=dict)
    batches: int = 0
    requests: int = 0
    reconciled: int = 0  # prompts found already landed when a batch was retried or recovered
    recovered_batches: int = 0  # pending batches of an earlier, interrupted run
    full_scans: int = 0
    index_rebuilds: int = 0  # the signature index rebuilt from the project (missing or stale)
    duplicates_removed: int = 0
    task_number: int = 0
    verified: bool = False  # the project's task count matched the ledger at the end (else: rescan)
    elapsed_s: float = 0.0
    seconds: dict[str, float] = Field(default_factory=dict)  # where the time went, by phase
    prompts_per_s: float = 0.0
    imported_per_s: float = 0.0

    @property
    def balanced(self) -> bool:
        return self.records == self.imported + self.duplicate + self.quarantined


@flow(name="ingest-prompts", flow_run_name="ingest {params.source} -> {params.project}", log_prints=False)
def ingest_prompts(params: IngestParams) -> IngestReport:
    """Import every new prompt under an S3 prefix into a Label Studio project, exactly once.

    Rejected records and files are quarantined in the source bucket; the report counts every
    record as imported, duplicate or quarantined.
    """
    timer, logger = PhaseTimer(), get_run_logger()
    clients = Clients(get_settings())
    s3, lsc = clients.s3, clients.labelstudio
    bucket, prefix = parse_s3_uri(params.source)
    state_prefix = params.state_prefix.strip("/")
    if not bucket_exists(s3, bucket):
        raise ConfigError(f"source bucket {bucket!r} does not exist (from {params.source})")
    with timer.phase("project"):
        project = ensure_project_task(lsc, params.project, create=params.create_project)
    lock = s3_lock(s3, bucket, state_prefix, ingest_lock_name(project.id),
                   lease_s=params.lock_lease_s or clients.settings.locks.lease_s)
    ledger = Ledger(s3, bucket, state_prefix, project.id, fence=lock.fence)
    importer = ProjectImporter(lsc, ledger, state_prefix=state_prefix,
                               batch_size=params.batch_size, timeout_s=params.import_timeout_s,
                               doubt_s=params.import_doubt_s,
                               near_duplicates=(prompt_config(params.near_duplicate_threshold)
                                                if params.near_duplicates else None),
                               timer=timer, logger=logger)
    tally = IntakeTally()
    with contextlib.ExitStack() as held:
        with timer.phase("lock"):
            held.enter_context(lock.held(params.lock_timeout_s))
        with timer.phase("ledger"):
            importer.open(str(project.created_at))
        with timer.phase("list"):
            selection = select_objects(s3.list(prefix, bucket=bucket), ledger.processed_objects(),
                                       state_prefix, params.max_files)
        progress = ProgressBar(len(selection.todo), key=artifact_key("ingest-progress", project.id),
                               description=f"Ingest {params.source} -> {project.title}")
        for n, obj in enumerate(selection.todo, 1):
            uri = s3.uri(obj.key, bucket=bucket)
            with timer.phase("read"):
                outcome = read_prompt_file_task(s3, bucket, obj, params.fields, params.limits,
                                           state_prefix, return_state=True)
            if outcome.is_failed():  # I/O kept failing after retries: try again next run
                tally.files_failed += 1
                logger.error("could not read %s (left for the next run): %s", uri, outcome.message)
                continue
            intake = tally.take(outcome.result(), params.max_records)
            if intake.problem is not None:
                logger.warning("quarantined %s: %s", uri, intake.problem)
            tally.duplicate += importer.add_file(obj, uri, intake)
            progress.update(n)
            if not intake.complete:  # max_records reached: the rest waits for the next run
                break
        totals = importer.finish()
    report = _report(params, project, ledger, selection, tally, totals, timer)
    with timer.phase("publish"):
        _publish(report)
    report.seconds = timer.seconds()
    if not report.balanced:
        raise RuntimeError(
            f"counts do not add up: {report.records} records != {report.imported} imported + "
            f"{report.duplicate} duplicate + {report.quarantined} quarantined"
        )
    return report


def _report(params: IngestParams, project: Any, ledger: Ledger, selection: Selection,
            tally: IntakeTally, totals: ImportTotals, timer: PhaseTimer) -> IngestReport:
    elapsed = round(timer.elapsed(), 3)
    return IngestReport(
        source=params.source, project=project.title, project_id=project.id, ledger=ledger.uri(),
        files_listed=selection.listed, files_unchanged=selection.unchanged,
        files_read=tally.files_read, files_quarantined=tally.files_quarantined,
        files_failed=tally.files_failed, records=tally.records, imported=totals.imported,
        duplicate=tally.duplicate, quarantined=tally.quarantined + totals.quarantined,
        reasons=dict(sorted((tally.reasons + totals.reasons).items())),
        batches=totals.batches, requests=totals.requests, reconciled=totals.reconciled,
        recovered_batches=totals.recovered_batches, full_scans=totals.full_scans,
        index_rebuilds=totals.index_rebuilds,
        duplicates_removed=totals.duplicates_removed, task_number=totals.task_number,
        verified=totals.verified, elapsed_s=elapsed,
        prompts_per_s=round(tally.records / elapsed, 1) if elapsed else 0.0,
        imported_per_s=round(totals.imported / elapsed, 1) if elapsed else 0.0,
    )


def _publish(report: IngestReport) -> None:
    rows = [
        {"metric": k, "value": v}
        for k, v in report.model_dump(exclude={"reasons"}).items()
    ] + [{"metric": f"quarantined: {k}", "value": v} for k, v in report.reasons.items()]
    create_table_artifact(table=rows, key=artifact_key("ingest-report", report.project_id),
                          description=f"Ingest {report.source} -> {report.project}")
    emit_event(
        event=PROMPTS_INGESTED,
        resource=project_resource(report.project_id),
        payload={"project_id": report.project_id, "project": report.project,
                 "imported": report.imported, "duplicate": report.duplicate,
                 "quarantined": report.quarantined, "records": report.records,
                 "source": report.source},
    )
