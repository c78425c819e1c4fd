"""Flow ``finetune``: train a model on a dataset version, watch the job, record its lineage.

Trigger: ``sftflow finetune``, the pipeline flow, or a deployment reacting to
``sftflow.dataset.versioned``.

Inputs (:class:`FinetuneParams`): dataset ``NAME[@VERSION]`` (default: ``refs/latest``), backend
(``trl`` by default, ``openai``, or any registered one), base model, method (full or LoRA),
hyperparameters, gates and watch deadline.

Before any side effect: the version's manifest is read and every file's sha256 verified; the
gates (minimum train rows, eval split present, prompt/completion format, chat JSONL valid for
``openai``) and the backend's preflight (base model exists, training deployment registered)
must pass, else the flow fails with one clear error and nothing is submitted.

Outputs: ``s3://<bucket>/<models_prefix>/<job>/manifest.json`` (lineage: dataset version and
its manifest sha256, base model, config, backend and job id, status, metrics, artifacts, eval
gate, error); for ``trl`` the model or adapter under ``<job>/model/``; the dataset tag
``trained-<job>`` on the version; ``_refs/<dataset>/best`` moved to the better model; events
``sftflow.finetune.submitted | succeeded | failed``; Prefect artifacts with the gates and result.

Idempotency: the job name is a hash of (version manifest sha256, normalised config). A rerun
with a finished job returns it without training again (a failed one fails again with its
recorded error, never a new attempt); a rerun after a crash resumes watching the job it had
submitted (submission is idempotent per job name on every backend).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from pydantic import BaseModel, Field

import sftflow
from sftflow.core import events
from sftflow.core.errors import SftflowError
from sftflow.tasks._prefect import compute_task, io_task
from sftflow.tasks.clients import Clients
from sftflow.tasks.finetune import gate, lineage
from sftflow.tasks.finetune.backends import (
    TERMINAL,
    Backend,
    Baseline,
    Hyperparameters,
    JobSpec,
    JobStatus,
    get_backend,
)
from sftflow.tasks.polling import Backoff
from sftflow.tasks.storage import S3


class FinetuneParams(BaseModel):
    dataset: str = Field(description="Dataset version to train on: NAME or NAME@VERSION (default latest).")
    backend: str | None = Field(None, description="trl (default from settings), openai, or a registered backend.")
    base_model: str = Field(description="Base model: hub id, s3:// prefix or local folder (trl); model name (openai).")
    method: Literal["full", "lora"] = Field("lora", description="Full fine-tune or LoRA adapter (trl).")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Training knobs.")
    min_train_rows: int = Field(10, ge=1, description="Gate: the version needs at least this many train rows.")
    min_eval_rows: int = Field(1, ge=0, description="Gate: and this many eval rows (0 allows no eval split).")
    deadline_s: float = Field(6 * 3600, gt=0, description="Stop watching after this long (the job keeps its record).")
    poll_min_s: float = Field(2.0, gt=0, description="First pause between status polls.")
    poll_max_s: float = Field(60.0, gt=0, description="Longest pause between status polls (backoff cap).")
    cancel_on_deadline: bool = Field(False, description="Cancel the job when the deadline passes.")
    eval_gate: bool = Field(True, description="Compare eval loss with the dataset's best model; tag the better one best.")
    bucket: str | None = Field(None, description="Bucket of datasets and models (empty: the configured bucket).")


class FinetuneReport(BaseModel):
    job: str
    dataset: str
    version: str
    backend: str
    backend_job_id: str | None = None
    status: str
    reused: bool = False
    metrics: dict[str, Any] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict)
    fine_tuned_model: str | None = None
    eval_gate: dict[str, Any] | None = None
    error: str | None = None
    lineage_uri: str
    gates: list[dict[str, Any]] = Field(default_factory=list)


def _not_user_error(task, task_run, state) -> bool:
    """Retry I/O failures, not clear errors (bad input, missing model, checksum mismatch)."""
    try:
        state.result()
    except SftflowError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


io_checked = io_task(retry_condition_fn=_not_user_error)


@io_checked
def read_version(s3: S3, datasets_prefix: str, ref: str) -> dict[str, Any]:
    """The verified manifest of ``NAME[@VERSION]`` and the sha256 of its bytes."""
    from sftflow.tasks import versioning

    name, ref_version = versioning.parse_ref(ref.strip())
    version = versioning.resolve(s3, name, ref_version, prefix=datasets_prefix)  # id, tag or latest
    manifest = versioning.load_manifest(s3, name, version, verify=True, prefix=datasets_prefix)
    key = f"{versioning.dataset_root(datasets_prefix, name)}/versions/{version}/manifest.json"
    raw, _ = s3.get_bytes(key)
    return {
        "dataset": name,
        "version": version,
        "manifest": manifest,
        "manifest_uri": s3.uri(key),
        "manifest_sha256": hashlib.sha256(raw).hexdigest(),
    }


@compute_task
def check_gates(manifest: dict[str, Any], where: str, backend: str, min_train: int, min_eval: int) -> list[dict]:
    checks = gate.version_gates(manifest, backend=backend, min_train_rows=min_train, min_eval_rows=min_eval)
    create_table_artifact(key="finetune-gates", table=checks, description=f"Fine-tune gates of {where}")
    gate.require_gates(checks, where)
    return checks


@io_checked
def preflight(backend: Backend, spec: JobSpec) -> dict[str, Any]:
    return backend.preflight(spec)


@io_task
def read_lineage(s3: S3, prefix: str, job: str) -> dict[str, Any] | None:
    found = lineage.read_record(s3, prefix, job)
    return found[0] if found else None


@io_task
def create_lineage(s3: S3, prefix: str, record: dict[str, Any]) -> dict[str, Any]:
    return lineage.create_record(s3, prefix, record)[0]


@io_task
def update_lineage(s3: S3, prefix: str, job: str, changes: dict[str, Any], event: str | None = None) -> dict:
    return lineage.update_record(s3, prefix, job, changes, event=event)


@io_task(retries=2)
def submit_job(backend: Backend, spec: JobSpec) -> str:
    return backend.submit(spec)


@io_task
def job_status(backend: Backend, backend_job_id: str) -> JobStatus:
    return backend.status(backend_job_id)


@io_task
def job_result(backend: Backend, backend_job_id: str, spec: JobSpec):
    return backend.result(backend_job_id, spec)


@io_task
def cancel_job(backend: Backend, backend_job_id: str) -> None:
    backend.cancel(backend_job_id)


@io_task
def find_baseline(s3: S3, prefix: str, dataset: str, job: str) -> tuple[Baseline | None, str | None]:
    """The dataset's current best model (another job) and the ref's ETag, for the eval gate."""
    best, etag = lineage.read_model_ref(s3, prefix, dataset)
    if best is None or best == job:
        return None, etag
    found = lineage.read_record(s3, prefix, best)
    if not found or not found[0].get("artifacts", {}).get("model"):
        return None, etag
    rec = found[0]
    return Baseline(job=best, model_uri=rec["artifacts"]["model"], base_model=rec["base_model"],
                    method=rec["method"]), etag


@io_task
def promote(s3: S3, prefix: str, dataset: str, job: str, expected_etag: str | None) -> bool:
    """Move ``best`` to ``job`` unless another run moved it since we read it."""
    try:
        lineage.set_model_ref(s3, prefix, dataset, job, expected_etag)
        return True
    except lineage.PreconditionFailed:
        return False


@io_task
def tag_version(s3: S3, datasets_prefix: str, dataset: str, version: str, job: str) -> str:
    from sftflow.tasks import versioning

    tag = f"trained-{job}"
    versioning.set_tag(s3, dataset, tag, version, prefix=datasets_prefix)
    return tag


def _emit(name: str, record: dict[str, Any]) -> None:
    payload = {k: record.get(k) for k in ("job", "dataset", "version", "backend", "status")}
    if record.get("error"):
        payload["error"] = record["error"]
    emit_event(event=name, resource=events.model_resource(record["job"]),
               related=[{**events.dataset_resource(record["dataset"]), "prefect.resource.role": "dataset"}],
               payload=payload)


def _report(record: dict[str, Any], reused: bool, gates: list[dict[str, Any]]) -> FinetuneReport:
    return FinetuneReport(
        job=record["job"], dataset=record["dataset"], version=record["version"],
        backend=record["backend"], backend_job_id=record.get("backend_job_id"),
        status=record["status"], reused=reused, metrics=record.get("metrics") or {},
        artifacts=record.get("artifacts") or {}, fine_tuned_model=record.get("fine_tuned_model"),
        eval_gate=record.get("eval_gate"), error=record.get("error"),
        lineage_uri=record["lineage_uri"], gates=gates,
    )


def _watch(backend: Backend, backend_job_id: str, params: FinetuneParams, on_change) -> JobStatus | None:
    """Poll with backoff until a terminal state or the deadline; None when the deadline passed."""
    backoff = Backoff(params.poll_min_s, max(params.poll_min_s, params.poll_max_s))
    deadline = time.monotonic() + params.deadline_s
    last = None
    for _ in range(backoff.max_polls(params.deadline_s)):
        status = job_status(backend, backend_job_id)
        changed = status.state != last
        if changed:
            on_change(status)
            last = status.state
        if status.state in TERMINAL:
            return status
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        time.sleep(min(remaining, backoff.next_delay(progressed=changed)))
    return None


@flow(name="finetune")
def finetune(params: FinetuneParams) -> FinetuneReport:
    logger = get_run_logger()
    clients = Clients.for_bucket(params.bucket)
    settings = clients.settings
    s3 = clients.s3
    prefix = settings.finetune.models_prefix
    backend_name = params.backend or settings.finetune.backend

    # 1. Everything that can be wrong with the input fails here, before any side effect.
    v = read_version(s3, settings.datasets.prefix, params.dataset)
    where = f"{v['dataset']}@{v['version']}"
    gates = check_gates(v["manifest"], where, backend_name, params.min_train_rows, params.min_eval_rows)
    backend = get_backend(backend_name, clients)
    config = {"backend": backend_name, "base_model": params.base_model, "method": params.method,
              "hyperparameters": params.hyperparameters.model_dump(mode="json")}
    job = lineage.job_name(v["manifest_sha256"], config)

    earlier = read_lineage(s3, prefix, job)
    if earlier and earlier["status"] in TERMINAL:
        logger.info("%s@%s with this config is job %s (%s): not training again",
                    v["dataset"], v["version"], job, earlier["status"])
        if earlier["status"] != "succeeded":
            raise SftflowError(f"job {job} on {where} already ended {earlier['status']}: "
                               f"{earlier.get('error')} (lineage {earlier['lineage_uri']}); "
                               "change the config to train again")
        return _report(earlier, True, gates)

    from sftflow.tasks import versioning

    files = v["manifest"]
    spec = JobSpec(
        job=job, dataset=v["dataset"], version=v["version"], base_model=params.base_model,
        method=params.method, hyperparameters=params.hyperparameters,
        train_files=versioning.data_files(s3, files, "train", "parquet"),
        eval_files=versioning.data_files(s3, files, "eval", "parquet"),
        chat_train_files=versioning.data_files(s3, files, "train", "openai_chat"),
        chat_eval_files=versioning.data_files(s3, files, "eval", "openai_chat"),
        output_uri=lineage.output_uri(s3, prefix, job),
    )
    baseline_etag = None
    if backend_name == "trl" and params.eval_gate:
        spec.baseline, baseline_etag = find_baseline(s3, prefix, v["dataset"], job)
    checks = preflight(backend, spec)

    # 2. Submit once: the record first (create-only), then the job, then its id.
    from prefect.runtime import flow_run

    record = earlier or create_lineage(s3, prefix, {
        "job": job, "status": "submitted", "dataset": v["dataset"], "version": v["version"],
        "dataset_manifest": v["manifest_uri"], "dataset_manifest_sha256": v["manifest_sha256"],
        "base_model": params.base_model, "method": params.method,
        "hyperparameters": params.hyperparameters.model_dump(mode="json"),
        "config": config, "config_hash": lineage.config_hash(config), "backend": backend_name,
        "backend_job_id": None, "baseline": spec.baseline.model_dump() if spec.baseline else None,
        "preflight": checks, "submitted_at": lineage.now(), "finished_at": None,
        "metrics": {}, "artifacts": {}, "fine_tuned_model": None, "error": None, "eval_gate": None,
        "lineage_uri": s3.uri(lineage.manifest_key(prefix, job)), "run_id": str(flow_run.get_id()),
        "code_version": sftflow.__version__, "history": [{"at": lineage.now(), "event": "submitted"}],
    })
    if record.get("backend_job_id"):
        backend_job_id = record["backend_job_id"]
        logger.info("resuming watch of %s (%s job %s)", job, backend_name, backend_job_id)
    else:
        backend_job_id = submit_job(backend, spec)
        record = update_lineage(s3, prefix, job, {"backend_job_id": backend_job_id})
        _emit(events.FINETUNE_SUBMITTED, record)
        logger.info("submitted %s as %s job %s", job, backend_name, backend_job_id)

    # 3. Watch to a terminal state within the deadline.
    def on_change(status: JobStatus) -> None:
        if status.state not in TERMINAL:  # terminal states are recorded with their outcome below
            update_lineage(s3, prefix, job, {"status": status.state, "backend_status": status.detail},
                           event=status.state)

    final = _watch(backend, backend_job_id, params, on_change)
    if final is None:
        if params.cancel_on_deadline:
            cancel_job(backend, backend_job_id)
            record = update_lineage(s3, prefix, job, {"status": "cancelled", "finished_at": lineage.now(),
                                                      "error": f"deadline of {params.deadline_s:.0f} s passed"},
                                    event="cancelled (deadline)")
            _emit(events.FINETUNE_FAILED, record)
        raise SftflowError(f"job {job} ({backend_name} {backend_job_id}) did not finish within "
                           f"{params.deadline_s:.0f} s; rerun the same command to keep watching")

    # 4. Record the outcome: lineage, eval gate, dataset tag, events.
    if final.state != "succeeded":
        record = update_lineage(s3, prefix, job, {"status": final.state, "error": final.error,
                                                  "finished_at": lineage.now()})
        _emit(events.FINETUNE_FAILED, record)
        _summary(record)
        raise SftflowError(f"fine-tune job {job} {final.state}: {final.error} (lineage {record['lineage_uri']})")

    result = job_result(backend, backend_job_id, spec)
    changes: dict[str, Any] = {"status": "succeeded", "finished_at": lineage.now(),
                               "metrics": result.metrics, "artifacts": result.artifacts,
                               "fine_tuned_model": result.fine_tuned_model}
    if backend_name == "trl" and params.eval_gate:
        decision = gate.eval_gate(result.metrics, spec.baseline.job if spec.baseline else None)
        if decision.pop("promote"):
            moved = promote(s3, prefix, v["dataset"], job, baseline_etag)
            decision["tagged_best"] = moved
            if not moved:
                decision["reason"] += "; best moved during training, not promoted"
        else:
            decision["tagged_best"] = False
        changes["eval_gate"] = decision
    changes["dataset_tag"] = tag_version(s3, settings.datasets.prefix, v["dataset"], v["version"], job)
    record = update_lineage(s3, prefix, job, changes, event="recorded")
    _emit(events.FINETUNE_SUCCEEDED, record)
    _summary(record)
    return _report(record, False, gates)


def _summary(record: dict[str, Any]) -> None:
    lines = [
        f"# Fine-tune {record['job']}: {record['status']}",
        (f"- dataset: `{record['dataset']}@{record['version']}` (manifest sha256 "
         f"`{record['dataset_manifest_sha256'][:16]}…`)"),
        f"- backend: {record['backend']} job `{record.get('backend_job_id')}`",
        f"- base model: `{record['base_model']}` ({record['method']})",
        f"- lineage: `{record['lineage_uri']}`",
    ]
    if record.get("error"):
        lines.append(f"- error: {record['error']}")
    if record.get("eval_gate"):
        lines.append(f"- eval gate: {record['eval_gate'].get('decision')} ({record['eval_gate'].get('reason')})")
    if record.get("metrics"):
        lines += ["", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {val} |" for k, val in record["metrics"].items()]
    create_markdown_artifact(key="finetune-result", markdown="\n".join(lines),
                             description=f"Lineage of {record['job']}")
