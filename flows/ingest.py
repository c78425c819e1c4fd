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
- ``s3://<source bucket>/<state_prefix>/quarantine/``: rejected records and files, with reasons;
- artifacts: a progress bar while importing, a table of counts and throughput;
- event ``sftflow.prompts.ingested`` with the counts.

Idempotency: a prompt whose ``prompt_id`` (sha256 of the normalised text) is already in the
project is never imported again; objects already processed (same key and ETag) are not read
again. Runs on the same project are serialised by a Prefect global concurrency limit. A batch
with an unknown outcome, or left pending by a crash, is reconciled against the project before
anything is sent again; a final check compares the project's task count with the ledger and
rescans (removing unannotated duplicates) if they disagree.
Every input record ends as exactly one of imported / duplicate / quarantined.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.events import emit_event
from pydantic import BaseModel, Field, field_validator

from sftflow.core.errors import ConfigError
from sftflow.core.events import PROMPTS_INGESTED, project_resource
from sftflow.core.settings import get_settings
from sftflow.tasks.clients import Clients
from sftflow.tasks.labelstudio.imports import (
    BatchResult,
    batch_prompt_ids,
    import_batch,
    remove_unannotated,
    scan_project_task,
    task_count,
    wait_settled,
)
from sftflow.tasks.labelstudio.projects import ensure_project_task
from sftflow.tasks.locks import global_lock
from sftflow.tasks.prompts import (
    FieldMapping,
    Ledger,
    Limits,
    ParsedFile,
    bucket_exists,
    prompt_id,
    read_prompt_file,
)
from sftflow.tasks.storage import ObjectInfo, parse_s3_uri


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
    import_timeout_s: float | None = Field(
        None, gt=0, description="HTTP timeout per import request (default: Label Studio settings)."
    )

    @field_validator("source")
    @classmethod
    def _s3_uri(cls, v: str) -> str:
        parse_s3_uri(v)
        return v


class IngestReport(BaseModel):
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


# -- helpers (orchestration only) ---------------------------------------------------------------
def _task_data(p: Any, obj: ObjectInfo, uri: str, batch: str, keep: dict | None) -> dict[str, Any]:
    data = {"prompt": p.prompt, "prompt_id": p.prompt_id, "source": uri,
            "source_etag": obj.etag.strip('"'), "source_row": p.row, "ingest_batch": batch}
    if keep:
        data.update(keep)
    return data


def _rescan(clients: Clients, project_id: int, ledger: Ledger, superseded: list[str],
            report: IngestReport) -> set[str]:
    """Read the project once, drop unannotated duplicate tasks, make that the ledger."""
    lsc = clients.labelstudio
    scan = scan_project_task(lsc, project_id, prompt_id)
    report.full_scans += 1
    if scan.duplicates:
        report.duplicates_removed += len(remove_unannotated(lsc, scan.duplicates))
    ledger.write_snapshot(scan.ids, task_count(lsc, project_id), superseded)
    return scan.ids


# -- the flow -----------------------------------------------------------------------------------
@flow(name="ingest-prompts", log_prints=False)
def ingest_prompts(params: IngestParams) -> IngestReport:
    started = time.monotonic()
    phases: Counter[str] = Counter()

    @contextlib.contextmanager
    def timed(phase: str) -> Iterator[None]:
        t = time.monotonic()
        yield
        phases[phase] += time.monotonic() - t

    logger = get_run_logger()
    settings = get_settings()
    clients = Clients(settings)
    s3, lsc = clients.s3, clients.labelstudio
    bucket, prefix = parse_s3_uri(params.source)
    state_prefix = params.state_prefix.strip("/")

    if not bucket_exists(s3, bucket):
        raise ConfigError(f"source bucket {bucket!r} does not exist (from {params.source})")
    with timed("project"):
        project = ensure_project_task(lsc, params.project, create=params.create_project)
    ledger = Ledger(s3, bucket, state_prefix, project.id)
    report = IngestReport(source=params.source, project=project.title, project_id=project.id,
                          ledger=ledger.uri())

    with contextlib.ExitStack() as held:
        with timed("lock"):
            held.enter_context(
                global_lock(f"sftflow-ingest-project-{project.id}", params.lock_timeout_s)
            )
        # 1. What is in the project already: ledger, then pending batches, then a count check.
        phase_t = time.monotonic()
        state = ledger.load(str(project.created_at))
        for batch in state.pending:
            if ledger.segment_key(batch) in state.segment_keys:  # confirmed, marker left over
                ledger.drop_pending(batch)
                continue
            wait_settled(lsc, project.id, settle_s=1.0)
            there = batch_prompt_ids(lsc, project.id, batch)
            state.segment_keys.append(ledger.confirm(batch, there, sum(there.values())))
            state.ids.update(there)
            state.expected_tasks += sum(there.values())
            report.recovered_batches += 1
            report.reconciled += len(there)
        known = state.ids
        expected = state.expected_tasks
        count_at_start = task_count(lsc, project.id)
        if count_at_start != expected:
            logger.info("ledger and project disagree: reading the project's prompt_ids")
            known = _rescan(clients, project.id, ledger, state.segment_keys, report)
            expected = count_at_start = task_count(lsc, project.id)

        phases["ledger"] += time.monotonic() - phase_t
        # 2. Which source objects are new or changed.
        phase_t = time.monotonic()
        done = ledger.processed_objects()
        todo: list[ObjectInfo] = []
        for obj in s3.list(prefix, bucket=bucket):
            if obj.key.startswith(state_prefix + "/") or obj.key.endswith("/"):
                continue
            report.files_listed += 1
            if Ledger.is_processed(done, obj):
                report.files_unchanged += 1
            elif params.max_files is None or len(todo) < params.max_files:
                todo.append(obj)

        phases["list"] += time.monotonic() - phase_t
        # 3. Read, dedupe, import in batches; one batch in flight while the next is read.
        progress_id = create_progress_artifact(
            progress=0.0, key=f"ingest-progress-{project.id}",
            description=f"Ingest {params.source} -> {project.title}",
        ) if todo else None
        reasons: Counter[str] = Counter()
        run_tag = uuid.uuid4().hex[:12]
        buffer: list[dict[str, Any]] = []
        read_done: list[tuple[ObjectInfo, dict[str, Any]]] = []  # waiting for their batches
        in_flight: tuple[Any, list[tuple[ObjectInfo, dict]]] | None = None

        def settle(pending: tuple[Any, list[tuple[ObjectInfo, dict]]]) -> None:
            nonlocal expected
            future, objects = pending
            with timed("import_wait"):
                result: BatchResult = future.result()
            refused = {t["prompt_id"] for t, _ in result.rejected}
            ledger.confirm(result.batch, result.landed, len(result.landed))
            expected += len(result.landed)
            report.imported += len(result.landed)
            report.reconciled += result.reconciled
            report.requests += result.requests
            if result.rejected:
                report.quarantined += len(refused)
                for task, why in result.rejected:
                    reasons[why.split(":", 1)[0]] += 1
                    known.discard(task["prompt_id"])
                s3.put_bytes(
                    f"{state_prefix}/quarantine/rejected/{result.batch}.jsonl",
                    "".join(json.dumps({"reason": why, "task": t}, ensure_ascii=False) + "\n"
                            for t, why in result.rejected).encode(),
                    bucket=bucket,
                )
            for obj, summary in objects:
                ledger.mark_object(obj, summary)

        def flush() -> None:
            nonlocal buffer, read_done, in_flight
            if in_flight is not None:
                settle(in_flight)
                in_flight = None
            if not buffer:
                for obj, summary in read_done:
                    ledger.mark_object(obj, summary)
                read_done = []
                return
            batch = buffer[0]["ingest_batch"]
            ledger.mark_pending(batch, len(buffer))
            future = import_batch.submit(lsc, project.id, batch, buffer,
                                         timeout_s=params.import_timeout_s)
            report.batches += 1
            in_flight = (future, read_done)
            buffer, read_done = [], []

        stop = False
        shown = time.monotonic()  # progress is updated at most once a second
        for n, obj in enumerate(todo, 1):
            uri = s3.uri(obj.key, bucket=bucket)
            with timed("read"):
                outcome = read_prompt_file(s3, bucket, obj, params.fields, params.limits,
                                           state_prefix, return_state=True)
            if outcome.is_failed():  # I/O kept failing after retries: try again next run
                report.files_failed += 1
                logger.error("could not read %s (left for the next run): %s", uri, outcome.message)
                continue
            parsed: ParsedFile = outcome.result()
            report.files_read += 1
            prompts, rejected = parsed.prompts, parsed.rejected
            if params.max_records is not None:
                room = params.max_records - report.records
                if parsed.records > room:  # leave the rest (and this object) for the next run
                    last = _nth_row(parsed, room)
                    prompts = [p for p in prompts if p.row <= last]
                    rejected = [r for r in rejected if r.row <= last]
                    stop = True
            report.records += len(prompts) + len(rejected)
            report.quarantined += len(rejected)
            reasons.update(r.reason for r in rejected)
            if parsed.problem is not None:
                report.files_quarantined += 1
                reasons[f"file:{parsed.problem.reason}"] += 1
                logger.warning("quarantined %s: %s", uri, parsed.problem)
            file_counts: Counter[str] = Counter()
            for p in prompts:
                if p.prompt_id in known:
                    report.duplicate += 1
                    file_counts["duplicate"] += 1
                    continue
                known.add(p.prompt_id)
                file_counts["new"] += 1
                if not buffer:
                    batch_id = f"{run_tag}-{report.batches:05d}"
                buffer.append(_task_data(p, obj, uri, batch_id, p.extra))
                if len(buffer) >= params.batch_size:
                    flush()
            if not stop:
                read_done.append((obj, {"records": len(prompts) + len(rejected),
                                        "quarantined": len(rejected), **file_counts,
                                        "problem": parsed.problem.reason if parsed.problem else None}))
            if progress_id is not None and (n == len(todo) or time.monotonic() - shown > 1):
                update_progress_artifact(progress_id, progress=100.0 * n / len(todo))
                shown = time.monotonic()
            if stop:
                break
        flush()
        flush()  # settles the last batch in flight and marks the objects read after it

        # 4. Verify: the project holds exactly what the ledger expects, else rescan and repair.
        phase_t = time.monotonic()
        # Nothing sent: the count read at the start still holds (saves a request on reruns).
        report.task_number = task_count(lsc, project.id) if report.batches else count_at_start
        report.verified = report.task_number == expected
        if not report.verified:
            logger.warning("project has %d tasks, ledger expects %d: rescanning",
                           report.task_number, expected)
            _rescan(clients, project.id, ledger,
                    [o.key for o in s3.list(f"{ledger.root}/segments/", bucket=bucket)], report)
            report.task_number = task_count(lsc, project.id)
        phases["verify"] += time.monotonic() - phase_t
    report.reasons = dict(sorted(reasons.items()))
    report.elapsed_s = round(time.monotonic() - started, 3)
    report.prompts_per_s = round(report.records / report.elapsed_s, 1) if report.elapsed_s else 0.0
    report.imported_per_s = round(report.imported / report.elapsed_s, 1) if report.elapsed_s else 0.0
    with timed("publish"):
        _publish(report)
    report.seconds = {k: round(v, 3) for k, v in phases.items()}
    if not report.balanced:
        raise RuntimeError(
            f"counts do not add up: {report.records} records != {report.imported} imported + "
            f"{report.duplicate} duplicate + {report.quarantined} quarantined"
        )
    return report


def _nth_row(parsed: ParsedFile, n: int) -> int:
    """The row number of the n-th record of the file (records are kept in row order)."""
    rows = sorted([p.row for p in parsed.prompts] + [r.row for r in parsed.rejected])
    return rows[n - 1] if n > 0 else 0


def _publish(report: IngestReport) -> None:
    rows = [
        {"metric": k, "value": v}
        for k, v in report.model_dump(exclude={"reasons"}).items()
    ] + [{"metric": f"quarantined: {k}", "value": v} for k, v in report.reasons.items()]
    create_table_artifact(table=rows, key=f"ingest-report-{report.project_id}",
                          description=f"Ingest {report.source} -> {report.project}")
    emit_event(
        event=PROMPTS_INGESTED,
        resource=project_resource(report.project_id),
        payload={"project_id": report.project_id, "project": report.project,
                 "imported": report.imported, "duplicate": report.duplicate,
                 "quarantined": report.quarantined, "records": report.records,
                 "source": report.source},
    )
