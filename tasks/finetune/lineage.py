"""Model lineage in the bucket: which model came from which data, with what config and result.

Layout under ``s3://<bucket>/<models_prefix>/``:

- ``<job>/manifest.json``: the lineage record (dataset, version, the dataset manifest's sha256,
  base model, method, config, backend and its job id, status, metrics, artifacts, eval gate,
  error, state history). Created with ``If-None-Match: *`` when the job is submitted, then
  updated with compare-and-swap (``If-Match`` on its ETag) on every status change.
- ``<job>/model/``, ``<job>/result.json``: what the ``trl`` training flow uploads.
- ``_refs/<dataset>/best``: the job name of the dataset's best model (advanced with CAS).

The job name is the idempotency key: ``ft-`` + sha256 of (dataset manifest sha256, normalised
config), so the same version trained with the same config is one job, whatever reruns happen.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from sftflow.core.errors import SftflowError
from sftflow.tasks.storage import S3, PreconditionFailed

REFS = "_refs"


def now() -> str:
    return datetime.now(UTC).isoformat()


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the config as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def job_name(dataset_manifest_sha256: str, config: dict[str, Any]) -> str:
    digest = hashlib.sha256(f"{dataset_manifest_sha256}\n{config_hash(config)}".encode())
    return "ft-" + digest.hexdigest()[:20]


def manifest_key(prefix: str, job: str) -> str:
    return f"{prefix.strip('/')}/{job}/manifest.json"


def output_uri(s3: S3, prefix: str, job: str) -> str:
    return s3.uri(f"{prefix.strip('/')}/{job}")


def read_record(s3: S3, prefix: str, job: str) -> tuple[dict[str, Any], str] | None:
    """The lineage record and its ETag, or None."""
    try:
        data, etag = s3.get_bytes(manifest_key(prefix, job))
    except KeyError:
        return None
    return json.loads(data), etag


def load_record(s3: S3, prefix: str, job: str) -> dict[str, Any]:
    found = read_record(s3, prefix, job)
    if found is None:
        raise SftflowError(f"no model {job!r}: {s3.uri(manifest_key(prefix, job))} does not exist")
    return found[0]


def _dump(record: dict[str, Any]) -> bytes:
    return json.dumps(record, indent=2, default=str, ensure_ascii=False).encode()


def create_record(s3: S3, prefix: str, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Write a new record (create-only). Returns ``(record, True)``, or the one already there
    and False when another run created it first."""
    try:
        s3.put_bytes(manifest_key(prefix, record["job"]), _dump(record), if_none_match=True,
                     content_type="application/json")
        return record, True
    except PreconditionFailed:
        return load_record(s3, prefix, record["job"]), False


def update_record(s3: S3, prefix: str, job: str, changes: dict[str, Any],
                  *, event: str | None = None, attempts: int = 8) -> dict[str, Any]:
    """Merge ``changes`` into the record with compare-and-swap, re-reading on a lost race.

    ``event`` (e.g. the new status) is appended to ``history`` with a timestamp.
    """
    for _ in range(attempts):
        found = read_record(s3, prefix, job)
        if found is None:
            raise SftflowError(f"no lineage record to update at {s3.uri(manifest_key(prefix, job))}")
        record, etag = found
        record.update(changes)
        record["updated_at"] = now()
        if event:
            record.setdefault("history", []).append({"at": record["updated_at"], "event": event})
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


def list_records(s3: S3, prefix: str, dataset: str | None = None) -> list[dict[str, Any]]:
    """Every lineage record (optionally of one dataset), oldest submission first."""
    records = []
    for job in list_jobs(s3, prefix):
        found = read_record(s3, prefix, job)
        if found and (dataset is None or found[0].get("dataset") == dataset):
            records.append(found[0])
    return sorted(records, key=lambda r: r.get("submitted_at") or "")


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
