"""The ingest ledger and the other state ingest keeps in the source bucket.

``Ledger`` records, per Label Studio project, the prompt_ids imported and the source objects
processed; ``quarantine_keys`` and ``rejected_batch_key`` name where unusable input goes. The
S3-facing parts take an ``S3`` client and never read settings.

State written into the *source* bucket, under ``<state_prefix>/`` (default ``_sftflow/``)::

    ingest/project-<id>/meta.json                   which Label Studio project this ledger is for
    ingest/project-<id>/snapshot.json               prompt_ids in the project at the last full
                                                    reconcile, and its task count then
    ingest/project-<id>/segments/<batch>.json       prompt_ids of each confirmed import batch
    ingest/project-<id>/pending/<batch>.json        a batch sent whose outcome is not yet known
    ingest/project-<id>/objects/<key-hash>/<etag>   a source object fully processed
    quarantine/records/<key>@<etag>.jsonl           rejected records, with reason and line/row
    quarantine/files/<key>@<etag>                   a copy of a rejected file (+ ``.reason.json``)
    quarantine/rejected/<batch>.jsonl               tasks of a batch that Label Studio refused
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from sftflow.core.clock import utc_now, utc_now_iso
from sftflow.core.hashing import sha256_hex
from sftflow.tasks.adapters.s3 import S3, ObjectInfo, PreconditionFailed


# -- quarantine -------------------------------------------------------------------------------
def _clean_etag(etag: str) -> str:
    return etag.strip('"')


def quarantine_keys(state_prefix: str, key: str, etag: str) -> tuple[str, str]:
    """(records quarantine key, file quarantine key) of one source object version."""
    tag = _clean_etag(etag)
    base = f"{state_prefix.rstrip('/')}/quarantine"
    return f"{base}/records/{key}@{tag}.jsonl", f"{base}/files/{key}@{tag}"


def quarantine_records(s3: S3, bucket: str, state_prefix: str, obj: ObjectInfo,
                       records: list[dict[str, Any]]) -> str:
    """Write one object's rejected records (one JSON line each) to its records quarantine."""
    key = quarantine_keys(state_prefix, obj.key, obj.etag)[0]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    s3.put_bytes(key, body.encode("utf-8", "replace"), bucket=bucket,
                 content_type="application/x-ndjson")
    return key


def quarantine_file(s3: S3, bucket: str, state_prefix: str, obj: ObjectInfo,
                    reason: dict[str, Any], *, copy: bool) -> str:
    """Quarantine one source object: a server-side copy (when ``copy``; never a read into
    memory) next to ``<copy>.reason.json`` holding ``reason``. The source is not deleted;
    the ledger then records the object (key + ETag) as processed, so it is not read again
    until it changes."""
    key = quarantine_keys(state_prefix, obj.key, obj.etag)[1]
    if copy:
        s3.client.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": obj.key})
        reason = {**reason, "copy": s3.uri(key, bucket=bucket)}
    s3.put_bytes(f"{key}.reason.json", json.dumps(reason, indent=2).encode(), bucket=bucket,
                 content_type="application/json")
    return key


def rejected_batch_key(state_prefix: str, batch: str) -> str:
    """Quarantine key of the tasks of one import batch that Label Studio refused."""
    return f"{state_prefix.rstrip('/')}/quarantine/rejected/{batch}.jsonl"


def bucket_exists(s3: S3, bucket: str) -> bool:
    """Whether the bucket exists (checked first: some S3 servers create buckets on write)."""
    from botocore.exceptions import ClientError

    try:
        s3.client.head_bucket(Bucket=bucket)
    except ClientError as err:
        if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (403, 404):
            return False
        raise
    return True


# -- the ledger -------------------------------------------------------------------------------
def _key_hash(key: str) -> str:
    return sha256_hex(key)[:32]


@dataclass
class LedgerState:
    """What the ledger says about a project: its prompt_ids and the task count to expect."""

    ids: set[str]
    expected_tasks: int
    pending: list[str]  # batches sent whose outcome is not known (a run stopped midway)
    segment_keys: list[str]
    found: bool  # False: no ledger for this project yet (or one for another project instance)


class PendingBatch(BaseModel):
    """``pending/<batch>.json``: a batch about to be sent, and when (its request may live on
    the server for a while after that)."""

    batch: str
    tasks: int
    at: datetime


class Ledger:
    """Per-project record of imported prompt_ids and processed source objects, in S3.

    Every write is a whole small object, so a crash leaves either the old or the new state.
    A batch is written as ``pending`` before it is sent and as a ``segment`` once confirmed;
    pending markers left by a crash are resolved by reconciling against the project.
    """

    def __init__(self, s3: S3, bucket: str, state_prefix: str, project_id: int,
                 fence: Callable[[], None] | None = None):
        """``fence()`` is called before every write and raises when this run may no longer
        write (the ingest lock's ``S3Lock.fence``: a holder whose lease was taken over)."""
        self.s3, self.bucket = s3, bucket
        self.root = f"{state_prefix.rstrip('/')}/ingest/project-{project_id}"
        self.project_id = project_id
        self.fence = fence or (lambda: None)

    def uri(self) -> str:
        return self.s3.uri(self.root + "/", bucket=self.bucket)

    # reading
    def _get_json(self, key: str) -> Any:
        return json.loads(self.s3.get_bytes(key, bucket=self.bucket)[0])

    def _read_many(self, keys: list[str]) -> list[Any]:
        if not keys:
            return []
        with ThreadPoolExecutor(max_workers=min(16, len(keys))) as pool:
            return list(pool.map(self._get_json, keys))

    def load(self, project_created_at: str) -> LedgerState:
        """The ledger's view. A ledger written for another project instance (same id, other
        creation time, e.g. after a Label Studio reset) is wiped and reported as not found."""
        try:
            meta = self._get_json(f"{self.root}/meta.json")
        except KeyError:
            meta = None
        if meta is not None and meta.get("project_created_at") != project_created_at:
            self.fence()
            self.s3.delete((o.key for o in self.s3.list(self.root + "/", bucket=self.bucket)),
                           bucket=self.bucket)
            meta = None
        if meta is None:
            self.fence()
            self.s3.put_bytes(
                f"{self.root}/meta.json",
                json.dumps({"project_id": self.project_id, "project_created_at": project_created_at,
                            "created_at": utc_now_iso()}).encode(),
                bucket=self.bucket,
            )
            return LedgerState(set(), 0, [], [], found=False)
        keys = self.segment_keys()
        pending = sorted(o.key.rsplit("/", 1)[-1].removesuffix(".json")
                         for o in self.s3.list(f"{self.root}/pending/", bucket=self.bucket))
        try:
            snap = self._get_json(f"{self.root}/snapshot.json")
        except KeyError:
            snap = {"ids": [], "task_number": 0}
        ids = set(snap["ids"])
        expected = int(snap["task_number"])
        for seg in self._read_many(keys):
            ids.update(seg["ids"])
            expected += int(seg["tasks_added"])
        return LedgerState(ids, expected, pending, keys, found=True)

    def processed_objects(self) -> dict[str, set[str]]:
        """key hash -> etags already processed (one listing, no reads)."""
        done: dict[str, set[str]] = {}
        prefix = f"{self.root}/objects/"
        for o in self.s3.list(prefix, bucket=self.bucket):
            khash, _, etag = o.key[len(prefix):].partition("/")
            done.setdefault(khash, set()).add(etag)
        return done

    @staticmethod
    def is_processed(done: dict[str, set[str]], obj: ObjectInfo) -> bool:
        return _clean_etag(obj.etag) in done.get(_key_hash(obj.key), ())

    def segment_keys(self) -> list[str]:
        """Keys of every confirmed batch's segment."""
        return [o.key for o in self.s3.list(f"{self.root}/segments/", bucket=self.bucket)]

    # writing
    def segment_key(self, batch: str) -> str:
        return f"{self.root}/segments/{batch}.json"

    def drop_pending(self, batch: str) -> None:
        self.fence()
        self.s3.delete([f"{self.root}/pending/{batch}.json"], bucket=self.bucket)

    def mark_pending(self, batch: str, tasks: int) -> None:
        """Before a batch is sent. Recovery finds its tasks by ``data.ingest_batch``."""
        self.fence()
        self.s3.put_bytes(f"{self.root}/pending/{batch}.json",
                          json.dumps({"batch": batch, "tasks": tasks, "at": utc_now_iso()}).encode(),
                          bucket=self.bucket)

    def pending_marker(self, batch: str) -> PendingBatch:
        """The marker of a batch left pending. One that cannot be read counts as written just
        now, for more tasks than any batch has: its outcome is awaited for the longest."""
        try:
            return PendingBatch.model_validate_json(
                self.s3.get_bytes(f"{self.root}/pending/{batch}.json", bucket=self.bucket)[0])
        except (KeyError, ValueError):
            return PendingBatch(batch=batch, tasks=2**31, at=utc_now())

    def confirm(self, batch: str, ids: Iterable[str], tasks_added: int) -> str:
        """Record a batch's landed prompt_ids, then drop its pending marker."""
        self.fence()
        key = self.segment_key(batch)
        body = json.dumps({"batch": batch, "ids": sorted(ids), "tasks_added": tasks_added,
                           "at": utc_now_iso()}).encode()
        try:
            self.s3.put_bytes(key, body, bucket=self.bucket, if_none_match=True)
        except PreconditionFailed:
            pass  # already confirmed by an earlier attempt: same batch, same content
        self.drop_pending(batch)
        return key

    def write_snapshot(self, ids: Iterable[str], task_number: int, superseded: list[str]) -> None:
        """Replace the ledger by what the project holds now; older segments are dropped.

        A crash between the two steps leaves extra segments, so the expected task count is
        too high and the next run reconciles again: slower, never wrong.
        """
        self.fence()
        self.s3.put_bytes(
            f"{self.root}/snapshot.json",
            json.dumps({"ids": sorted(ids), "task_number": task_number, "at": utc_now_iso()}).encode(),
            bucket=self.bucket,
        )
        self.s3.delete(superseded, bucket=self.bucket)

    def mark_object(self, obj: ObjectInfo, summary: dict[str, Any]) -> None:
        self.fence()
        key = f"{self.root}/objects/{_key_hash(obj.key)}/{_clean_etag(obj.etag)}"
        self.s3.put_bytes(key, json.dumps({"key": obj.key, "etag": obj.etag, **summary,
                                           "at": utc_now_iso()}).encode(), bucket=self.bucket)
