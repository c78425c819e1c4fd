"""Model lineage in the bucket: which model came from which data, with what config and result.

Layout under ``s3://<bucket>/<models_prefix>/``:

- ``<job>/manifest.json``: the lineage record (dataset, version, the dataset manifest's sha256,
  base model, method, config, backend and its job id, status, metrics, artifacts, eval gate,
  error, state history, loss per step, the MLflow run if tracked, the training record (trl: what
  decided the token stream, and its fingerprint), the few-shot baseline (trl: the base model
  with k train rows in its prompt, the eval gate's third number), and the claim: which run may
  submit the job, until when). Created with ``If-None-Match: *`` before the job is submitted
  (the claim), then updated with compare-and-swap (``If-Match`` on its ETag) on every change;
  an expired claim is taken over with compare-and-swap too, so one run only submits
  (:func:`claim_submission`). The holder renews its claim every third of its lifetime while its
  submission runs (:func:`hold_claim`: a local training may outlive any fixed lifetime), so a
  live holder is never overtaken; a killed one renews nothing and its claim expires.
- ``<job>/model/``, ``<job>/result.json``: what the ``trl`` training flow uploads.
- ``_refs/<dataset>/best``: the job name of the dataset's best model (advanced with CAS).

The job name is the idempotency key: ``ft-`` + sha256 of (dataset manifest sha256, normalised
config), so the same version trained with the same config is one job, whatever reruns happen.
Records are :class:`LineageRecord`: written by this module, and validated when read back.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sftflow import __version__
from sftflow.core.clock import utc_now, utc_now_iso
from sftflow.core.errors import SftflowError
from sftflow.core.hashing import config_hash, sha256_hex
from sftflow.core.urls import redact_url
from sftflow.tasks.adapters.s3 import S3, PreconditionFailed
from sftflow.tasks.finetune.backends import Baseline, Hyperparameters
from sftflow.tasks.finetune.dataset import TrainingData
from sftflow.tasks.finetune.few_shot import FewShotResult
from sftflow.tasks.finetune.gate import eval_gate
from sftflow.tasks.finetune.tokens import TokenRecord
from sftflow.tasks.runtime.declare import io_task
from sftflow.tasks.runtime.renewal import Renewal, renewing

REFS = "_refs"
Status = Literal["submitted", "queued", "running", "succeeded", "failed", "cancelled"]


class SubmissionClaim(BaseModel):
    """Which run may submit the job: the one that wrote the claim, until ``expires_at`` (moved
    forward by the holder while it lives, :func:`hold_claim`). After that any run may take it
    over (conditional write): the holder is presumed dead."""

    run_id: str
    expires_at: datetime

    def live(self, now: datetime) -> bool:
        return self.expires_at > now

    @classmethod
    def new(cls, run_id: str, ttl_s: float, now: datetime | None = None) -> SubmissionClaim:
        return cls(run_id=run_id, expires_at=(now or utc_now()) + timedelta(seconds=ttl_s))


class LineageRecord(BaseModel):
    """``<models_prefix>/<job>/manifest.json``: which model came from which data, and how.

    Serialised with :meth:`to_dict`: exactly the keys that were set (a new record has no
    ``updated_at`` yet), plus any key a newer writer added (``extra="allow"``).
    """

    model_config = ConfigDict(extra="allow")

    job: str
    status: Status
    dataset: str
    version: str
    dataset_manifest: str | None = Field(None, description="s3:// URI of the version's manifest.json.")
    dataset_manifest_sha256: str | None = None
    base_model: str
    method: str | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict, description="What the job name hashes.")
    config_hash: str | None = None
    backend: str
    backend_job_id: str | None = None
    claim: SubmissionClaim | None = Field(None, description="The run allowed to submit the job.")
    baseline: dict[str, Any] | None = Field(None, description="The model the eval gate compares with.")
    preflight: dict[str, Any] = Field(default_factory=dict)
    submitted_at: str | None = None
    finished_at: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    artifacts: dict[str, Any] = Field(default_factory=dict)
    fine_tuned_model: str | None = None
    error: str | None = None
    eval_gate: dict[str, Any] | None = None
    lineage_uri: str
    run_id: str | None = None
    code_version: str | None = None
    history: list[dict[str, Any]] = Field(default_factory=list, description="[{at, event}]")
    loss_history: list[dict[str, Any]] = Field(
        default_factory=list, description="The backend's loss per logged step (JobResult.history).")
    tracking: dict[str, Any] | None = Field(
        None, description="The job's MLflow run (tracking_uri, experiment_id, run_id) or the tracker's error.")
    training_record: TokenRecord | None = Field(
        None, description="trl: what decided the token stream (tokenizer and chat template hashes, "
        "loss mask coverage, truncation, library versions, seed) and the hashes of its first batches.")
    few_shot: FewShotResult | None = Field(
        None, description="The eval gate's few-shot baseline: the base model with k train rows "
        "(seed, row numbers and hashes) in its prompt, its eval loss, or why it was skipped.")
    # set by updates
    updated_at: str | None = None
    backend_status: str | None = None
    dataset_tag: str | None = None

    @field_validator("tracking")
    @classmethod
    def _tracking_without_credentials(cls, tracking: dict[str, Any] | None) -> dict[str, Any] | None:
        """The tracking URI (and the tracker's error quoting it) without userinfo or secret
        query parameters, whoever reported it: no credential is stored in a record."""
        uri = (tracking or {}).get("tracking_uri")
        if not isinstance(uri, str) or redact_url(uri) == uri:
            return tracking
        safe = {**tracking, "tracking_uri": redact_url(uri)}  # type: ignore[dict-item]
        if isinstance(safe.get("error"), str):
            safe["error"] = safe["error"].replace(uri, safe["tracking_uri"])
        return safe

    @classmethod
    def submitted(cls, *, job: str, data: TrainingData, config: dict[str, Any],
                  baseline: Baseline | None, preflight: dict[str, Any], lineage_uri: str,
                  run_id: str, claim_ttl_s: float = 900.0, at: str | None = None) -> LineageRecord:
        """The record of a job about to be submitted (``config`` from :func:`job_config`)."""
        at = at or utc_now_iso()
        return cls(
            job=job, status="submitted", dataset=data.dataset, version=data.version,
            dataset_manifest=data.manifest_uri, dataset_manifest_sha256=data.manifest_sha256,
            base_model=config["base_model"], method=config["method"],
            hyperparameters=config["hyperparameters"], config=config,
            config_hash=config_hash(config, length=64), backend=config["backend"],
            backend_job_id=None, claim=SubmissionClaim.new(run_id, claim_ttl_s, datetime.fromisoformat(at)),
            baseline=baseline.model_dump() if baseline else None,
            preflight=preflight, submitted_at=at, finished_at=None, metrics={}, artifacts={},
            fine_tuned_model=None, error=None, eval_gate=None, lineage_uri=lineage_uri,
            run_id=run_id, code_version=__version__, history=[{"at": at, "event": "submitted"}],
        )

    @property
    def terminal(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)

    def event_payload(self) -> dict[str, Any]:
        """The payload of the ``sftflow.finetune.*`` events."""
        payload = {k: getattr(self, k) for k in ("job", "dataset", "version", "backend", "status")}
        if self.error:
            payload["error"] = self.error
        return payload

    def summary_markdown(self) -> str:
        lines = [
            f"# Fine-tune {self.job}: {self.status}",
            (f"- dataset: `{self.dataset}@{self.version}` (manifest sha256 "
             f"`{(self.dataset_manifest_sha256 or '')[:16]}…`)"),
            f"- backend: {self.backend} job `{self.backend_job_id}`",
            f"- base model: `{self.base_model}` ({self.method})",
            f"- lineage: `{self.lineage_uri}`",
        ]
        if self.error:
            lines.append(f"- error: {self.error}")
        if self.tracking:
            where = self.tracking.get("run_id") or f"not tracked: {self.tracking.get('error')}"
            lines.append(f"- MLflow run: `{where}` ({self.tracking.get('tracking_uri')})")
        if self.eval_gate:
            lines.append(f"- eval gate: {self.eval_gate.get('decision')} ({self.eval_gate.get('reason')})")
            lines += self._gate_table()
        elif self.few_shot and self.few_shot.skipped:
            lines.append(f"- few-shot baseline: skipped ({self.few_shot.skipped})")
        if self.metrics:
            lines += ["", "| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {val} |" for k, val in self.metrics.items()]
        return "\n".join(lines)


    def _gate_table(self) -> list[str]:
        """The eval gate's three numbers: this model, the previous best, the few-shot base."""
        gate, shots = self.eval_gate or {}, self.few_shot

        def loss(value: Any) -> str:
            return "n/a" if value is None else f"{value:.4f}"

        previous = gate.get("baseline_job")
        shown = (f"`{shots.base_model}` with {shots.k} train rows in its prompt (seed {shots.seed}"
                 f"{', cached' if shots.cached else ''})") if shots else "none"
        if shots and shots.skipped:
            shown += f": skipped, {shots.skipped}"
        return ["", "| eval loss on the eval completions | model | loss |", "| --- | --- | --- |",
                f"| new model | `{self.job}` | {loss(gate.get('eval_loss'))} |",
                f"| previous best | {f'`{previous}`' if previous else 'none'} | {loss(gate.get('baseline_eval_loss'))} |",
                f"| few-shot base | {shown} | {loss(gate.get('few_shot_eval_loss'))} |"]


def job_config(backend: str, base_model: str, method: str, hyperparameters: Hyperparameters) -> dict[str, Any]:
    """The normalised config a job name hashes (with the dataset manifest's sha256)."""
    return {"backend": backend, "base_model": base_model, "method": method,
            "hyperparameters": hyperparameters.model_dump(mode="json")}


def job_name(dataset_manifest_sha256: str, config: dict[str, Any]) -> str:
    return "ft-" + sha256_hex(f"{dataset_manifest_sha256}\n{config_hash(config, length=64)}")[:20]


def manifest_key(prefix: str, job: str) -> str:
    return f"{prefix.strip('/')}/{job}/manifest.json"


def output_uri(s3: S3, prefix: str, job: str) -> str:
    return s3.uri(f"{prefix.strip('/')}/{job}")


def read_record(s3: S3, prefix: str, job: str) -> tuple[LineageRecord, str] | None:
    """The lineage record and its ETag, or None."""
    key = manifest_key(prefix, job)
    try:
        data, etag = s3.get_bytes(key)
    except KeyError:
        return None
    record = LineageRecord.model_validate_json(data)
    if record.job != job:
        raise SftflowError(f"{s3.uri(key)} is the record of {record.job!r}, not {job!r}")
    return record, etag


def find_record(s3: S3, prefix: str, job: str) -> LineageRecord | None:
    found = read_record(s3, prefix, job)
    return found[0] if found else None


def load_record(s3: S3, prefix: str, job: str) -> LineageRecord:
    found = read_record(s3, prefix, job)
    if found is None:
        raise SftflowError(f"no model {job!r}: {s3.uri(manifest_key(prefix, job))} does not exist")
    return found[0]


def _dump(record: LineageRecord) -> bytes:
    return json.dumps(record.to_dict(), indent=2, default=str, ensure_ascii=False).encode()


def create_record(s3: S3, prefix: str, record: LineageRecord) -> tuple[LineageRecord, bool]:
    """Write a new record (create-only). Returns ``(record, True)``, or the one already there
    and False when another run created it first."""
    try:
        s3.put_bytes(manifest_key(prefix, record.job), _dump(record), if_none_match=True,
                     content_type="application/json")
        return record, True
    except PreconditionFailed:
        return load_record(s3, prefix, record.job), False


def claim_submission(s3: S3, prefix: str, new: LineageRecord, *, attempts: int = 8,
                     now: datetime | None = None) -> tuple[LineageRecord, bool]:
    """Claim the right to submit ``new.job`` for the run of ``new.claim``, with conditional
    writes so that of two concurrent runs one only gets it.

    ``(record, True)``: this run submits. It created the record (``If-None-Match: *``), or
    took over (``If-Match`` on the ETag) a claim that is its own (a retried run) or expired,
    or a record without claim (an older writer) that names no job yet. ``(record, False)``:
    the record names the job or has ended (use it), or another run's claim is live (ask again
    later: it names the job, or its claim expires).
    """
    if new.claim is None:
        raise ValueError("claim_submission needs a record with a claim")
    key = manifest_key(prefix, new.job)
    for _ in range(attempts):
        found = read_record(s3, prefix, new.job)
        if found is None:
            try:
                s3.put_bytes(key, _dump(new), if_none_match=True, content_type="application/json")
                return new, True
            except PreconditionFailed:
                continue
        record, etag = found
        held = record.claim
        if record.backend_job_id or record.terminal or (
                held and held.run_id != new.claim.run_id and held.live(now or utc_now())):
            return record, False
        at = utc_now_iso()
        taken = record.model_copy(update={
            "claim": new.claim, "updated_at": at,
            "history": [*record.history, {"at": at, "event": f"claimed by run {new.claim.run_id}"}]})
        try:
            s3.put_bytes(key, _dump(taken), if_match=etag, content_type="application/json")
            return taken, True
        except PreconditionFailed:
            continue
    raise SftflowError(f"lineage record {new.job} kept changing under us ({attempts} attempts)")


def renew_claim(s3: S3, prefix: str, job: str, claim: SubmissionClaim, ttl_s: float,
                *, attempts: int = 8) -> bool:
    """Move this run's claim on ``job`` to expire ``ttl_s`` from now (compare-and-swap on the
    record's ETag). False when there is nothing left to renew: the record names the job or has
    ended, or holds another run's claim (this one expired unrenewed and was taken over)."""
    key = manifest_key(prefix, job)
    for _ in range(attempts):
        found = read_record(s3, prefix, job)
        if found is None:
            return False
        record, etag = found
        if (record.backend_job_id or record.terminal or record.claim is None
                or record.claim.run_id != claim.run_id):
            return False
        renewed = record.model_copy(update={"claim": SubmissionClaim.new(claim.run_id, ttl_s)})
        try:
            s3.put_bytes(key, _dump(renewed), if_match=etag, content_type="application/json")
            return True
        except PreconditionFailed:
            continue
    raise SftflowError(f"lineage record {job} kept changing under us ({attempts} attempts)")


@contextlib.contextmanager
def hold_claim(s3: S3, prefix: str, record: LineageRecord, ttl_s: float) -> Iterator[Renewal]:
    """Hold this run's claim on ``record.job`` while the block (its submission) runs: renewed
    every ``ttl_s / 3`` from a background thread (``tasks/runtime/renewal.py``), so another run
    never takes over a live holder's claim however long the submission takes. A holder that
    dies renews nothing: its claim expires ``ttl_s`` after the last renewal."""
    if record.claim is None:
        raise ValueError("hold_claim needs a record with a claim")
    renew = partial(renew_claim, s3, prefix, record.job, record.claim, ttl_s)
    with renewing(renew, ttl_s / 3, name=f"claim-{record.job}") as renewal:
        yield renewal


def update_record(s3: S3, prefix: str, job: str, changes: dict[str, Any],
                  *, event: str | None = None, attempts: int = 8) -> LineageRecord:
    """Merge ``changes`` into the record with compare-and-swap, re-reading on a lost race.

    ``event`` (e.g. the new status) is appended to ``history`` with a timestamp.
    """
    for _ in range(attempts):
        found = read_record(s3, prefix, job)
        if found is None:
            raise SftflowError(f"no lineage record to update at {s3.uri(manifest_key(prefix, job))}")
        current, etag = found
        data = {**current.to_dict(), **changes, "updated_at": utc_now_iso()}
        if event:
            data["history"] = [*data.get("history", []), {"at": data["updated_at"], "event": event}]
        record = LineageRecord.model_validate(data)
        try:
            s3.put_bytes(manifest_key(prefix, job), _dump(record), if_match=etag,
                         content_type="application/json")
            return record
        except PreconditionFailed:
            continue
    raise SftflowError(f"lineage record {job} kept changing under us ({attempts} attempts)")


def list_jobs(s3: S3, prefix: str) -> list[str]:
    """Job names under the models prefix (one listing level, paginated)."""
    root = prefix.strip("/") + "/"
    jobs = []
    paginator = s3.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=s3.bucket, Prefix=root, Delimiter="/"):
        for common in page.get("CommonPrefixes", []):
            name = common["Prefix"][len(root):].rstrip("/")
            if name and not name.startswith("_"):
                jobs.append(name)
    return sorted(jobs)


def list_records(s3: S3, prefix: str, dataset: str | None = None) -> list[LineageRecord]:
    """Every lineage record (optionally of one dataset), oldest submission first."""
    records = []
    for job in list_jobs(s3, prefix):
        found = read_record(s3, prefix, job)
        if found and (dataset is None or found[0].dataset == dataset):
            records.append(found[0])
    return sorted(records, key=lambda r: r.submitted_at or "")


def _ref_key(prefix: str, dataset: str, name: str) -> str:
    return f"{prefix.strip('/')}/{REFS}/{dataset}/{name}"


def read_model_ref(s3: S3, prefix: str, dataset: str, name: str = "best") -> tuple[str | None, str | None]:
    """``(job, etag)`` of a dataset's model ref, ``(None, None)`` when unset."""
    try:
        data, etag = s3.get_bytes(_ref_key(prefix, dataset, name))
    except KeyError:
        return None, None
    return data.decode().strip(), etag


def set_model_ref(s3: S3, prefix: str, dataset: str, job: str, expected_etag: str | None,
                  name: str = "best") -> None:
    """Point the ref at ``job`` if it still has ``expected_etag`` (None: must not exist).

    Raises PreconditionFailed when another run moved it first.
    """
    key = _ref_key(prefix, dataset, name)
    if expected_etag is None:
        s3.put_bytes(key, job.encode(), if_none_match=True, content_type="text/plain")
    else:
        s3.put_bytes(key, job.encode(), if_match=expected_etag, content_type="text/plain")


def find_baseline(s3: S3, prefix: str, dataset: str, job: str) -> tuple[Baseline | None, str | None]:
    """The dataset's current best model (another job, with a saved model) for the eval gate,
    and the ``best`` ref's ETag (None: no ref yet) to promote against."""
    best, etag = read_model_ref(s3, prefix, dataset)
    record = find_record(s3, prefix, best) if best and best != job else None
    if record is None or not record.artifacts.get("model"):
        return None, etag
    return Baseline(job=best, model_uri=record.artifacts["model"], base_model=record.base_model,
                    method=record.method), etag


def promote(s3: S3, prefix: str, dataset: str, job: str, expected_etag: str | None) -> bool:
    """Move ``best`` to ``job`` unless another run moved it since it was read."""
    try:
        set_model_ref(s3, prefix, dataset, job, expected_etag)
        return True
    except PreconditionFailed:
        return False


def apply_eval_gate(s3: S3, prefix: str, dataset: str, job: str, metrics: dict[str, Any],
                    baseline: Baseline | None, expected_etag: str | None,
                    few_shot: dict[str, Any] | None = None) -> dict[str, Any]:
    """The eval gate's decision (``gate.eval_gate``: better than the previous best and than the
    few-shot base) with ``tagged_best``: whether ``best`` was moved to ``job`` (only from the
    state read before training, see :func:`promote`)."""
    decision = eval_gate(metrics, baseline.job if baseline else None, few_shot)
    wins = decision.pop("promote")
    decision["tagged_best"] = wins and promote(s3, prefix, dataset, job, expected_etag)
    if wins and not decision["tagged_best"]:
        decision["reason"] += "; best moved during training, not promoted"
    return decision


find_record_task = io_task(name="read-lineage")(find_record)
claim_submission_task = io_task(name="claim-submission")(claim_submission)
update_record_task = io_task(name="update-lineage")(update_record)
find_baseline_task = io_task(name="find-baseline")(find_baseline)
eval_gate_task = io_task(name="eval-gate")(apply_eval_gate)
