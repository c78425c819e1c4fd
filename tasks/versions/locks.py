"""Named, cluster-wide mutual exclusion: a leased, fenced lock record in S3.

``S3Lock`` (ingest per project, the dataset build per dataset): the owner record
``<prefix>/locks/<name>.json`` is taken with a conditional write (``If-None-Match: *`` for a new
record, ``If-Match: <etag>`` to take over an expired or released one), so exactly one contender
wins; the others poll with backoff, never sleeping past the end of the lease they read. It
survives a Prefect restart (it is not in Prefect) and a killed holder (its lease expires: the
next contender takes it over after ``lease_s``; the setting ``locks.lease_s``, 60 s by
default). The holder renews the lease every ``lease_s / 3`` from a background thread, so a live
holder that reaches S3 is never overtaken (it would have to miss two renewals in a row). Each
acquisition increments the record's fencing ``token``; ``fence()`` raises ``LeaseLost`` once
the record is no longer the one this holder wrote (taken over, or its lease ran out and could
not be renewed), and writers call it before every write.

A write of the holder's whose answer was lost (a reset connection, a gateway's 5xx) may have
landed: the client's retry with the same ``If-Match`` is then refused (412), and the ETag the
holder knows is stale. A 412 or a stale ETag costs a re-read, not the lock: the record is
still this holder's when its ``owner`` (one id per acquisition) and ``token`` are, and the
holder carries on with the record's ETag (``_adopt``).

Limits: expiry compares the holders' wall clocks (keep them in sync: NTP); ``fence()`` then a
write is two requests, so a holder that stalls between them longer than the lease could still
write once after a takeover (S3 cannot make one object's write conditional on another's). The
build lock serialises builds but its token does not fence the build's writes: a commit is
content-addressed and moves ``refs/latest`` by compare-and-swap, safe without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta

from pydantic import BaseModel

from sftflow.core.clock import utc_now
from sftflow.core.errors import SftflowError
from sftflow.tasks.adapters.s3 import S3, PreconditionFailed
from sftflow.tasks.runtime.polling import Backoff, wait_until
from sftflow.tasks.runtime.renewal import renewing

_log = logging.getLogger(__name__)


class LockTimeout(SftflowError):
    """Another holder kept the lock for longer than we could wait."""


class LeaseLost(SftflowError):
    """This holder's lease was taken over (or could not be renewed): it must not write."""


class LockRecord(BaseModel):
    """``<prefix>/locks/<name>.json``: who holds the lock, until when, with which token."""

    name: str
    owner: str  # one id per acquisition
    token: int  # fencing token: +1 at every acquisition, never reset
    expires_at: datetime
    released: bool = False
    holder: str = ""  # host:pid, for people reading the record

    def free(self, now: datetime) -> bool:
        return self.released or now >= self.expires_at


def lock_key(prefix: str, name: str) -> str:
    return f"{prefix.strip('/')}/locks/{name}.json"


class S3Lock:
    """One acquisition of a named lock (see the module docstring); use ``held()``."""

    def __init__(self, s3: S3, bucket: str, key: str, name: str, *, lease_s: float = 60.0):
        self.s3, self.bucket, self.key, self.name, self.lease_s = s3, bucket, key, name, lease_s
        self.owner = uuid.uuid4().hex
        self.token = 0
        self._etag: str | None = None
        self._lost: str | None = None
        self._busy_until: datetime | None = None  # the lease end of the holder last seen
        self._lock = threading.Lock()

    def _read(self) -> tuple[LockRecord, str] | None:
        try:
            body, etag = self.s3.get_bytes(self.key, bucket=self.bucket)
        except KeyError:
            return None
        return LockRecord.model_validate_json(body), etag

    def _record(self, token: int, *, released: bool = False) -> bytes:
        expires = utc_now() + (timedelta(0) if released else timedelta(seconds=self.lease_s))
        return LockRecord(name=self.name, owner=self.owner, token=token, expires_at=expires,
                          released=released, holder=f"{socket.gethostname()}:{os.getpid()}",
                          ).model_dump_json().encode()

    def try_acquire(self) -> bool:
        """Take the lock if it is free now (no record, released, or its lease expired)."""
        current = self._read()
        if current is not None and not current[0].free(utc_now()):
            self._busy_until = current[0].expires_at
            return False
        token = (current[0].token if current else 0) + 1
        try:
            etag = self.s3.put_bytes(self.key, self._record(token), bucket=self.bucket,
                                     if_none_match=current is None,
                                     if_match=current[1] if current else None,
                                     content_type="application/json")
        except PreconditionFailed:
            again = self._read()  # ours if our write landed and only its answer was lost
            if again is None or (again[0].owner, again[0].token) != (self.owner, token):
                return False  # another contender was faster
            etag = again[1]
        self.token, self._etag, self._lost = token, etag, None
        return True

    def acquire(self, timeout_s: float) -> None:
        """Wait (polling with backoff, never sleeping past the end of the lease last read)
        until the lock is ours, or raise LockTimeout."""
        if not wait_until(self.try_acquire, timeout_s=timeout_s, backoff=Backoff(0.5, 5.0),
                          sleep=self._sleep_within_lease):
            holder = self._read()
            raise LockTimeout(
                f"lock {self.name!r} (s3://{self.bucket}/{self.key}) still held after "
                f"{timeout_s:g} s" + (f" by {holder[0].holder}, lease until "
                                      f"{holder[0].expires_at:%Y-%m-%dT%H:%M:%SZ}" if holder else ""))

    def _sleep_within_lease(self, seconds: float) -> None:
        """Sleep ``seconds``, or less: until just after the holder's lease ends (a dead
        holder's lock is taken as its lease ends, not at the next backoff poll)."""
        if self._busy_until is not None:
            left = (self._busy_until - utc_now()).total_seconds() + 0.05
            seconds = min(seconds, max(0.05, left))
        time.sleep(seconds)

    def _adopt(self, current: tuple[LockRecord, str] | None) -> bool:
        """Whether ``current`` (the record as read) is still this holder's own: same owner and
        token, not released. Then its ETag becomes ours: a write of ours whose answer was lost
        landed (call with ``self._lock`` held)."""
        if current is None:
            return False
        rec, etag = current
        if rec.owner != self.owner or rec.token != self.token or rec.released:
            return False
        self._etag = etag
        return True

    def _put_own(self, *, released: bool = False) -> None:
        """Write this holder's record over the one it last wrote (``If-Match``); after a 412,
        once more over the record as read if that is still ours (``_adopt``). Raises
        PreconditionFailed when the record is another holder's (call with ``self._lock``)."""
        for attempt in range(2):
            try:
                self._etag = self.s3.put_bytes(
                    self.key, self._record(self.token, released=released), bucket=self.bucket,
                    if_match=self._etag, content_type="application/json")
                return
            except PreconditionFailed:
                if attempt or not self._adopt(self._read()):
                    raise

    def renew(self) -> bool:
        """Extend the lease; False (and ``fence()`` raises from then on) if it was lost."""
        with self._lock:
            if self._lost is not None or self._etag is None:
                return False
            try:
                self._put_own()
                return True
            except PreconditionFailed:
                self._lost = "the lock record changed: another holder took it over"
                return False

    def fence(self) -> None:
        """Raise LeaseLost unless this holder still holds the lock (checked against S3)."""
        with self._lock:
            lost = self._lost
            if lost is None:
                current = self._read()
                if current is None or (current[1] != self._etag and not self._adopt(current)):
                    lost = self._lost = "the lock record changed: another holder took it over"
                elif utc_now() >= current[0].expires_at:
                    lost = "the lease expired before it was renewed"
        if lost is not None:
            raise LeaseLost(f"lock {self.name!r} (token {self.token}) lost, refusing to write: "
                            f"{lost}")

    def release(self) -> None:
        """Mark the record released (its token stays: the next holder's is higher)."""
        with self._lock:
            if self._lost is None and self._etag is not None:
                with contextlib.suppress(PreconditionFailed):
                    self._put_own(released=True)
            self._etag = None

    @contextlib.contextmanager
    def held(self, timeout_s: float) -> Iterator[S3Lock]:
        """Acquire, renew in the background (every third of the lease) while the block runs,
        release."""
        self.acquire(timeout_s)
        try:
            with renewing(self.renew, self.lease_s / 3, name=f"lease-{self.name}"):
                yield self
        finally:
            self.release()


def s3_lock(s3: S3, bucket: str, prefix: str, name: str, *, lease_s: float = 60.0) -> S3Lock:
    """The lock ``name`` whose record is ``s3://<bucket>/<prefix>/locks/<name>.json``."""
    return S3Lock(s3, bucket, lock_key(prefix, name), name, lease_s=lease_s)


STATE_PREFIX = "_sftflow"  # lock records live under <bucket>/_sftflow/locks/ by default


def build_lock_name(dataset: str) -> str:
    return f"sftflow-build-dataset-{dataset}"


def build_lock(s3: S3, dataset: str, *, lease_s: float, prefix: str = STATE_PREFIX) -> S3Lock:
    """The build lock of ``dataset``: ``s3://<s3.bucket>/<prefix>/locks/
    sftflow-build-dataset-<dataset>.json``, in the bucket of the dataset's versions."""
    return s3_lock(s3, s3.bucket, prefix, build_lock_name(dataset), lease_s=lease_s)


def ingest_lock_name(project_id: int) -> str:
    return f"sftflow-ingest-project-{project_id}"
