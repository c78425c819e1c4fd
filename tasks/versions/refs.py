"""The refs of a dataset: ``refs/latest``, tags, and the markers of announced versions.

``refs/latest`` moves only by compare-and-swap (``advance_latest``: ``If-Match`` on its ETag,
re-reading and retrying on 412), and never to a version built from an older Label Studio read
than the one it names (``read_mark``: the watermark every build records in its manifest's
``source``, incremental or full; the freshest read wins, and no update is lost to a blind
overwrite). Tags are plain pointers and may be moved. ``refs/announced/<version>``
records that the version's ``dataset.versioned`` event was emitted, so a rerun stays quiet.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from sftflow.core.errors import SftflowError
from sftflow.tasks.adapters.s3 import S3, PreconditionFailed
from sftflow.tasks.runtime.declare import io_task
from sftflow.tasks.runtime.polling import Backoff, retry
from sftflow.tasks.versions.keys import DEFAULT_PREFIX, DatasetKeys, is_name
from sftflow.tasks.versions.manifest import manifest_at

#: Called with the name of each commit step (and ``cas-retry``), for tests to stop there.
Hook = Callable[[str], None]


def _read_text(s3: S3, key: str) -> tuple[str, str] | None:
    try:
        data, etag = s3.get_bytes(key)
    except KeyError:
        return None
    return data.decode().strip(), etag


def read_latest(s3: S3, keys: DatasetKeys) -> str | None:
    """The version ``refs/latest`` names, None before the first."""
    got = _read_text(s3, keys.latest)
    return got[0] if got else None


def latest_version(s3: S3, dataset: str, *, prefix: str = DEFAULT_PREFIX) -> str | None:
    return read_latest(s3, DatasetKeys.of(prefix, dataset))


def _read_tag(s3: S3, keys: DatasetKeys, tag: str) -> str | None:
    got = _read_text(s3, keys.tag(tag))
    return got[0] if got else None


def get_tag(s3: S3, dataset: str, tag: str, *, prefix: str = DEFAULT_PREFIX) -> str | None:
    return _read_tag(s3, DatasetKeys.of(prefix, dataset), tag)


def set_tag(s3: S3, dataset: str, tag: str, version: str, *, prefix: str = DEFAULT_PREFIX) -> None:
    """Point ``refs/tags/<tag>`` at an existing version (tags may be moved)."""
    keys = DatasetKeys.of(prefix, dataset)
    if s3.head(keys.manifest(version)) is None:
        raise SftflowError(f"dataset {dataset!r} has no version {version!r} ({s3.uri(keys.root)})")
    s3.put_bytes(keys.tag(tag), version.encode(), content_type="text/plain")


def list_tags(s3: S3, dataset: str, *, prefix: str = DEFAULT_PREFIX) -> dict[str, str]:
    keys = DatasetKeys.of(prefix, dataset)
    out = {}
    for obj in s3.list(keys.tags):
        got = _read_text(s3, obj.key)
        if got:
            out[DatasetKeys.tag_of(obj.key)] = got[0]
    return out


def versioned_event_id(dataset: str, version: str) -> uuid.UUID:
    """The ``dataset.versioned`` event's id for a version: the same for every emission, so
    Prefect's trigger service drops a repeated one (a retry or a rerun after a crash)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"sftflow:dataset.versioned:{dataset}@{version}")


def should_announce(s3: S3, dataset: str, version: str, latest: str | None, *,
                    prefix: str = DEFAULT_PREFIX) -> bool:
    """Whether a build of ``version`` emits ``dataset.versioned``: the version is
    ``refs/latest`` (this run moved it there, or found it there after a crash) and its event
    was not recorded as emitted. An unchanged rebuild of an announced version stays quiet; a
    version left behind one read later is never announced."""
    if latest != version:
        return False
    return s3.head(DatasetKeys.of(prefix, dataset).announced(version)) is None


def mark_announced(s3: S3, dataset: str, version: str, *, prefix: str = DEFAULT_PREFIX) -> None:
    """Record that ``version``'s event was emitted (after emitting it)."""
    s3.put_bytes(DatasetKeys.of(prefix, dataset).announced(version), b"",
                 content_type="text/plain")


def resolve_at(s3: S3, keys: DatasetKeys, dataset: str, version: str | None) -> str:
    """``resolve`` for a dataset whose keys are ``keys``."""
    if version is None:
        found = read_latest(s3, keys)
        if found is None:
            raise SftflowError(f"dataset {dataset!r} has no version yet ({s3.uri(keys.latest)})")
        return found
    if is_name(version) and s3.head(keys.manifest(version)) is not None:
        return version
    if is_name(version):
        tagged = _read_tag(s3, keys, version)
        if tagged:
            return tagged
    raise SftflowError(f"dataset {dataset!r} has no version or tag {version!r} "
                       f"({s3.uri(keys.root)})")


def resolve(s3: S3, dataset: str, version: str | None, *, prefix: str = DEFAULT_PREFIX) -> str:
    """A version id from None (latest), a tag or an id; clear error when there is none."""
    return resolve_at(s3, DatasetKeys.of(prefix, dataset), dataset, version)


def read_mark(source: Mapping[str, Any]) -> str:
    """When the rows of a version were read from Label Studio, from its manifest's ``source``:
    the ``watermark`` every build records (on Label Studio's own clock, less the overlap: an
    incremental build's is the latest ``updated_at`` its listing saw, a full build's the export
    snapshot's creation), else the export ``snapshot_at`` (manifests written before builds
    recorded a watermark); "" when unknown. Two reads with no edit between them tie."""
    return str(source.get("watermark") or source.get("snapshot_at") or "")


def _instant(mark: str | None) -> datetime | None:
    """A read mark as a UTC time to the second (older manifests' watermarks came from a
    ``Date`` header, a second's precision); None when missing or unreadable."""
    if not mark:
        return None
    try:
        dt = datetime.fromisoformat(str(mark))
    except ValueError:
        return None
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    return dt.replace(microsecond=0)


def read_is_older(mark: str | None, than: str | None) -> bool:
    """Whether a read marked ``mark`` is older than one marked ``than`` (to the second; an
    unknown mark orders nothing)."""
    mine, theirs = _instant(mark), _instant(than)
    return mine is not None and theirs is not None and mine < theirs


def _mark_of(s3: S3, keys: DatasetKeys, version: str) -> str:
    """The read mark of a committed version ("" if unknown)."""
    try:
        manifest = manifest_at(s3, keys.manifest(version), keys.root)
    except KeyError:
        return ""
    return read_mark(manifest.source)


class _Contention(Exception):
    """refs/latest changed between our read and our conditional write."""


def advance_latest(
    s3: S3, root: str, version: str, read_at: str | None, *, max_attempts: int = 20,
    hook: Hook | None = None,
) -> tuple[bool, str | None, int, str | None]:
    """Move ``refs/latest`` to ``version``, whose rows this build read at ``read_at`` (its
    ``read_mark``), with compare-and-swap, unless it names a version read later (compared at
    every attempt, against the version it names then). Returns (moved, latest afterwards, CAS
    retries, superseded_by)."""
    keys = DatasetKeys(root)
    key = keys.latest
    retries = 0

    def attempt() -> tuple[bool, str | None, int, str | None]:
        nonlocal retries
        current = _read_text(s3, key)
        if current and current[0] == version:
            return False, version, retries, None
        if current and read_is_older(read_at, _mark_of(s3, keys, current[0])):
            return False, current[0], retries, current[0]
        try:
            if current is None:
                s3.put_bytes(key, version.encode(), if_none_match=True, content_type="text/plain")
            else:
                s3.put_bytes(key, version.encode(), if_match=current[1], content_type="text/plain")
        except PreconditionFailed:
            retries += 1
            if hook:
                hook("cas-retry")
            raise _Contention from None
        return True, version, retries, None

    try:
        return retry(attempt, attempts=max_attempts,
                     retry_if=lambda err: isinstance(err, _Contention),
                     backoff=Backoff(0.05, 2.0, jitter=0.5))
    except _Contention:
        raise SftflowError(
            f"could not move {s3.uri(key)} after {max_attempts} attempts (contention)"
        ) from None


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
set_tag_task = io_task(name="set-tag")(set_tag)
