"""Immutable, content-addressed dataset versions in object storage.

Layout under ``s3://<bucket>/<prefix>/<dataset>/`` (the *dataset root*)::

    shards/<sha256>.parquet                 rows, content-addressed, shared between versions
    shards/openai/<sha256>.jsonl            the same rows as OpenAI chat JSONL
    shards/trl/<sha256>.jsonl               the same rows as TRL prompt/completion JSONL
    versions/<version>/README.md            dataset card (HF YAML front matter)
    versions/<version>/exclusions.jsonl     every dropped row with its reason
    versions/<version>/manifest.json        the version: files + sha256 + sizes + rows, ...
    refs/latest                             text: a version id (moved with If-Match CAS)
    refs/tags/<tag>                         text: a version id
    refs/announced/<version>                empty: the version's ``dataset.versioned`` event
                                            was emitted (written after the emission)

Commit protocol: (1) upload shards (even when they exist: the same bytes, a refreshed age for
``gc``) and the version's own files, (2) write ``manifest.json`` with ``If-None-Match: *`` and
check that every file it lists exists (put back what a concurrent ``gc`` deleted), (3) move
``refs/latest`` with
``If-Match`` on its ETag, re-reading and retrying on 412. Readers trust only refs and
manifests and verify checksums, so a crash before (2) leaves unreferenced objects (``gc``
removes them) and a crash between (2) and (3) leaves a complete version that a rerun points
``refs/latest`` at. ``refs/latest`` never moves to a version built from an older Label
Studio snapshot than the one it names (concurrent builds: the freshest export wins, no
update is lost to a blind overwrite).

The version id is a hash of the sorted row hashes (each row hash covers the split) and of
the build configuration: unchanged annotations rebuild to the same id, and nothing is written.

Records: ``Manifest`` and its ``FileEntry`` list (pydantic) are the manifest's one shape, for
the writer and every reader. ``load_manifest`` validates what it reads: a file path that is
absolute or climbs out of the dataset root, an unknown split, or a manifest describing another
version is refused, and file keys are built from the root the reader computed.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_serializer,
)

from sftflow.core.clock import utc_now, utc_now_iso
from sftflow.core.errors import SftflowError
from sftflow.core.failpoints import failpoint
from sftflow.core.hashing import config_hash, sha256_hex
from sftflow.core.settings import DatasetSettings
from sftflow.tasks.adapters.s3 import S3, ObjectInfo, PreconditionFailed
from sftflow.tasks.runtime.declare import io_task
from sftflow.tasks.runtime.polling import Backoff, retry
from sftflow.tasks.versions import formats, hub

if TYPE_CHECKING:
    from sftflow.tasks.versions.rows import Exclusion, SftRow

log = logging.getLogger(__name__)
DEFAULT_PREFIX: str = DatasetSettings.model_fields["prefix"].default
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SPLITS = ("train", "eval")
#: Parent shards with fewer rows than ``shard_rows // MERGE_BELOW`` are merged, not reused.
MERGE_BELOW = 4

Hook = Callable[[str], None]


def check_name(kind: str, name: str) -> str:
    if not _NAME.match(name or ""):
        raise SftflowError(
            f"invalid {kind} name {name!r}: use letters, digits, '.', '_' or '-' (max 128)"
        )
    return name


def dataset_root(settings_or_prefix: Any, dataset: str) -> str:
    """Key prefix of a dataset (no trailing slash): ``<prefix>/<dataset>``."""
    prefix = settings_or_prefix
    if hasattr(prefix, "datasets"):  # the Settings object
        prefix = prefix.datasets.prefix
    elif hasattr(prefix, "prefix"):  # DatasetSettings
        prefix = prefix.prefix
    prefix = str(prefix or "").strip("/")
    check_name("dataset", dataset)
    return f"{prefix}/{dataset}" if prefix else dataset


def version_id(row_hashes: Iterable[str], cfg_hash: str) -> str:
    """16 hex chars of sha256 over the config hash and the sorted row hashes."""
    return sha256_hex("".join([f"{cfg_hash}\n", *(f"{h}\n" for h in sorted(row_hashes))]))[:16]


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``NAME[@VERSION_OR_TAG]`` -> ``(name, version_or_tag | None)``."""
    name, _, version = ref.partition("@")
    return check_name("dataset", name), (version or None)


# -- the manifest --------------------------------------------------------------------------------
class FileEntry(BaseModel):
    """One file of a version, relative to the dataset root. ``of``: for a JSONL copy, the
    sha256 of the Parquet shard it was written from (absent from the JSON otherwise)."""

    model_config = ConfigDict(frozen=True)

    path: str
    split: Literal["train", "eval"] | None
    format: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    rows: int = Field(ge=0)
    of: str | None = None

    @field_validator("path")
    @classmethod
    def _inside_the_root(cls, path: str) -> str:
        parts = path.split("/")
        if (path.startswith("/") or "\\" in path or "\x00" in path
                or any(p in ("", ".", "..") for p in parts) or posixpath.isabs(path)):
            raise ValueError(f"file path {path!r} leaves the dataset root")
        return path

    @model_serializer(mode="wrap")
    def _without_empty_of(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if self.of is None:
            data.pop("of", None)
        return data


class Manifest(BaseModel):
    """``versions/<version>/manifest.json``: what a version is. Written once by
    ``commit_version``; read back only through ``load_manifest`` (or ``Manifest.parse``),
    which locates its files under the root the reader computed, never under ``root`` as
    written in the file."""

    model_config = ConfigDict(populate_by_name=True)

    dataset: str
    version: str
    parent: str | None = None
    root: str  # as written by the committer; informative only
    created_at: str
    files: list[FileEntry]
    rows: dict[str, int]
    schema_: dict[str, str] = Field(default_factory=dict, alias="schema")
    source: dict[str, Any] = Field(default_factory=dict)
    stats: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    config_hash: str = ""
    code_version: str = ""
    run_id: str | None = None
    #: Rows dropped from reused shards: Parquet file path -> row positions (0-based). The
    #: shard's JSONL copies and signature sidecar hold the same rows in the same order.
    deleted: dict[str, list[int]] = Field(default_factory=dict)
    _base: str = PrivateAttr("")  # the dataset root this manifest was read from

    @classmethod
    def parse(cls, data: bytes, *, root: str, where: str) -> Manifest:
        """Validate manifest bytes read at ``where`` (a URI, for messages); files are then
        located under ``root``. Anything malformed is an SftflowError naming ``where``."""
        try:
            raw = json.loads(data)
        except ValueError as err:
            raise SftflowError(f"manifest {where} is not valid JSON: {err}") from err
        try:
            manifest = cls.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "manifest"
            raise SftflowError(f"manifest {where} is refused: {loc}: {first['msg']}") from None
        sizes = {f.path: f.rows for f in manifest.files_of("parquet")}
        for path, positions in manifest.deleted.items():
            if path not in sizes or any(not 0 <= i < sizes[path] for i in positions):
                raise SftflowError(f"manifest {where} is refused: deleted rows of {path!r} "
                                   "name no rows of a listed Parquet file")
        return manifest.located(root)

    @model_serializer(mode="wrap")
    def _without_empty_deleted(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if not self.deleted:
            data.pop("deleted", None)  # manifests without deletions keep their old bytes
        return data

    def located(self, root: str) -> Manifest:
        self._base = root
        return self

    def key(self, path: str) -> str:
        """The object key of a file path of this manifest."""
        if not self._base:
            raise SftflowError(f"manifest of {self.dataset}@{self.version} was not located")
        return f"{self._base}/{path}"

    def files_of(self, fmt: str, split: str | None = None) -> list[FileEntry]:
        """Files of one format (and split, unless None), in manifest order."""
        return [f for f in self.files if f.format == fmt and (split is None or f.split == split)]

    def shard_of(self, f: FileEntry) -> str:
        """The Parquet path whose rows ``f`` holds (itself, or the shard it was written from)."""
        if f.of is None:
            return f.path
        return next((p.path for p in self.files_of("parquet") if p.sha256 == f.of), f.path)

    def to_json(self) -> bytes:
        """The manifest's bytes as committed (key order and layout fixed)."""
        return json.dumps(self.model_dump(by_alias=True), indent=1, ensure_ascii=False,
                          default=str).encode()


# -- refs and manifests --------------------------------------------------------------------------
def _read_text(s3: S3, key: str) -> tuple[str, str] | None:
    try:
        data, etag = s3.get_bytes(key)
    except KeyError:
        return None
    return data.decode().strip(), etag


def latest_version(s3: S3, dataset: str, *, prefix: str = DEFAULT_PREFIX) -> str | None:
    got = _read_text(s3, f"{dataset_root(prefix, dataset)}/refs/latest")
    return got[0] if got else None


def get_tag(s3: S3, dataset: str, tag: str, *, prefix: str = DEFAULT_PREFIX) -> str | None:
    got = _read_text(s3, f"{dataset_root(prefix, dataset)}/refs/tags/{check_name('tag', tag)}")
    return got[0] if got else None


def set_tag(s3: S3, dataset: str, tag: str, version: str, *, prefix: str = DEFAULT_PREFIX) -> None:
    """Point ``refs/tags/<tag>`` at an existing version (tags may be moved)."""
    root = dataset_root(prefix, dataset)
    if s3.head(f"{root}/versions/{version}/manifest.json") is None:
        raise SftflowError(f"dataset {dataset!r} has no version {version!r} ({s3.uri(root)})")
    s3.put_bytes(f"{root}/refs/tags/{check_name('tag', tag)}", version.encode(),
                 content_type="text/plain")


def list_tags(s3: S3, dataset: str, *, prefix: str = DEFAULT_PREFIX) -> dict[str, str]:
    root = dataset_root(prefix, dataset)
    out = {}
    for obj in s3.list(f"{root}/refs/tags/"):
        got = _read_text(s3, obj.key)
        if got:
            out[obj.key.rsplit("/", 1)[-1]] = got[0]
    return out


def versioned_event_id(dataset: str, version: str) -> uuid.UUID:
    """The ``dataset.versioned`` event's id for a version: the same for every emission, so
    Prefect's trigger service drops a repeated one (a retry or a rerun after a crash)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"sftflow:dataset.versioned:{dataset}@{version}")


def _announced_key(root: str, version: str) -> str:
    return f"{root}/refs/announced/{check_name('version', version)}"


def should_announce(s3: S3, dataset: str, version: str, latest: str | None, *,
                    prefix: str = DEFAULT_PREFIX) -> bool:
    """Whether a build of ``version`` emits ``dataset.versioned``: the version is
    ``refs/latest`` (this run moved it there, or found it there after a crash) and its event
    was not recorded as emitted. An unchanged rebuild of an announced version stays quiet; a
    version left behind a newer snapshot's is never announced."""
    if latest != version:
        return False
    return s3.head(_announced_key(dataset_root(prefix, dataset), version)) is None


def mark_announced(s3: S3, dataset: str, version: str, *, prefix: str = DEFAULT_PREFIX) -> None:
    """Record that ``version``'s event was emitted (after emitting it)."""
    s3.put_bytes(_announced_key(dataset_root(prefix, dataset), version), b"",
                 content_type="text/plain")


def resolve(s3: S3, dataset: str, version: str | None, *, prefix: str = DEFAULT_PREFIX) -> str:
    """A version id from None (latest), a tag or an id; clear error when there is none."""
    root = dataset_root(prefix, dataset)
    if version is None:
        found = latest_version(s3, dataset, prefix=prefix)
        if found is None:
            raise SftflowError(f"dataset {dataset!r} has no version yet ({s3.uri(root)}/refs/latest)")
        return found
    if _NAME.match(version) and s3.head(f"{root}/versions/{version}/manifest.json") is not None:
        return version
    if _NAME.match(version):
        tagged = get_tag(s3, dataset, version, prefix=prefix)
        if tagged:
            return tagged
    raise SftflowError(f"dataset {dataset!r} has no version or tag {version!r} ({s3.uri(root)})")


def kept_positions(manifest: Manifest, f: FileEntry) -> list[int]:
    """Row positions of ``f`` (a shard or one of its copies) that belong to the version:
    all but the ones its manifest records as deleted. Every reader of rows applies this."""
    gone = set(manifest.deleted.get(manifest.shard_of(f), ()))
    return [i for i in range(f.rows) if i not in gone]


def read_file(s3: S3, manifest: Manifest, f: FileEntry) -> bytes:
    """A listed file's bytes, size and sha256 checked."""
    key = manifest.key(f.path)
    try:
        data, _ = s3.get_bytes(key)
    except KeyError:
        raise SftflowError(
            f"{manifest.dataset}@{manifest.version}: file {s3.uri(key)} is missing") from None
    if len(data) != f.size or sha256_hex(data) != f.sha256:
        raise SftflowError(f"{manifest.dataset}@{manifest.version}: checksum mismatch for "
                           f"{s3.uri(key)}")
    return data


def read_rows(s3: S3, manifest: Manifest, f: FileEntry, columns: Sequence[str] | None = None):
    """A Parquet shard of the version as a pyarrow table, deleted rows left out."""
    table = pq.read_table(io.BytesIO(read_file(s3, manifest, f)), columns=columns)
    if manifest.deleted.get(f.path):
        table = table.take(pa.array(kept_positions(manifest, f), type=pa.int64()))
    return table


def read_jsonl_lines(s3: S3, manifest: Manifest, f: FileEntry) -> list[str]:
    """The lines of a JSONL copy of a shard that belong to the version."""
    lines = read_file(s3, manifest, f).decode().splitlines()
    if not manifest.deleted.get(manifest.shard_of(f)):
        return lines
    return [lines[i] for i in kept_positions(manifest, f)]


def version_bytes(s3: S3, manifest: Manifest, f: FileEntry) -> bytes:
    """A file's bytes as the version holds it: checksum verified, then, for a shard or a
    JSONL copy with deleted rows, those rows left out (a Parquet shard is rewritten)."""
    if not manifest.deleted.get(manifest.shard_of(f)):
        return read_file(s3, manifest, f)
    if f.format == "parquet":
        buf = io.BytesIO()
        pq.write_table(read_rows(s3, manifest, f), buf, compression="zstd")
        return buf.getvalue()
    if f.path.endswith(".jsonl"):
        return "".join(line + "\n" for line in read_jsonl_lines(s3, manifest, f)).encode()
    return read_file(s3, manifest, f)


def derived_key(root: str, version: str, f: FileEntry) -> str:
    """Where a reader that needs whole files (a training job) keeps the trimmed copy of a
    shard with deleted rows: under the version, kept by ``gc`` while the version exists."""
    return f"{root}/derived/{check_name('version', version)}/{f.path}"


def file_key(manifest: Manifest, path: str) -> str:
    """The object key of one of ``manifest``'s file paths (under the root it was read from)."""
    return manifest.key(path)


def verify_files(s3: S3, manifest: Manifest, files: Sequence[FileEntry] | None = None) -> None:
    """Download every listed file and check size and sha256; SftflowError names the first bad one."""

    def check(f: FileEntry) -> None:
        read_file(s3, manifest, f)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(check, files if files is not None else manifest.files))


def _read_manifest(s3: S3, root: str, dataset: str, version: str) -> Manifest:
    key = f"{root}/versions/{version}/manifest.json"
    try:
        data, _ = s3.get_bytes(key)
    except KeyError:
        raise SftflowError(f"dataset {dataset!r} has no version {version!r} ({s3.uri(key)})") from None
    manifest = Manifest.parse(data, root=root, where=s3.uri(key))
    if (manifest.dataset, manifest.version) != (dataset, version):
        raise SftflowError(
            f"manifest {s3.uri(key)} is refused: it describes "
            f"{manifest.dataset}@{manifest.version}, not {dataset}@{version}"
        )
    return manifest


def load_manifest(
    s3: S3, dataset: str, version: str | None = None, verify: bool = True, *,
    prefix: str = DEFAULT_PREFIX,
) -> Manifest:
    """The validated manifest of ``version`` (an id or a tag; None: ``refs/latest``), its
    files verified. A manifest that names a file outside the dataset root, an unknown split
    or another version is refused (SftflowError naming it)."""
    version = resolve(s3, dataset, version, prefix=prefix)
    manifest = _read_manifest(s3, dataset_root(prefix, dataset), dataset, version)
    if verify:
        verify_files(s3, manifest)
    return manifest


def data_files(s3: S3, manifest: Manifest, split: str | None, fmt: str = "parquet") -> list[str]:
    """s3:// URIs of the version's files of one split and format, in manifest order."""
    return [s3.uri(manifest.key(f.path)) for f in manifest.files_of(fmt, split)]


def load_baseline(
    s3: S3, dataset: str | None, *, prefix: str = DEFAULT_PREFIX
) -> tuple[str | None, dict[str, Any] | None]:
    """``(version, Label Studio counters)`` recorded by the latest version of ``dataset``
    (``project_id``, ``num_tasks_with_annotations``, ...); ``(None, None)`` before the first
    version or without a dataset. What "new annotations" are counted from."""
    if not dataset:
        return None, None
    version = latest_version(s3, dataset, prefix=prefix)
    if version is None:
        return None, None
    manifest = load_manifest(s3, dataset, version, verify=False, prefix=prefix)
    return version, dict(manifest.source)


load_baseline_task = io_task(name="load-baseline")(load_baseline)


def list_datasets(s3: S3, *, prefix: str = DEFAULT_PREFIX) -> list[str]:
    base = (prefix.strip("/") + "/") if prefix.strip("/") else ""
    names = []
    for page in s3.client.get_paginator("list_objects_v2").paginate(
        Bucket=s3.bucket, Prefix=base, Delimiter="/"
    ):
        for cp in page.get("CommonPrefixes", []):
            names.append(cp["Prefix"][len(base):].rstrip("/"))
    return sorted(n for n in names if _NAME.match(n))


def list_versions(s3: S3, dataset: str, *, prefix: str = DEFAULT_PREFIX) -> list[dict[str, Any]]:
    """Every committed version (a manifest exists), oldest first, with summary fields."""
    root = dataset_root(prefix, dataset)

    def summary(key: str) -> dict[str, Any]:
        m = Manifest.parse(s3.get_bytes(key)[0], root=root, where=s3.uri(key))
        return {"version": m.version, "parent": m.parent, "created_at": m.created_at,
                "rows": m.rows, "run_id": m.run_id, "snapshot_at": m.source.get("snapshot_at")}

    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(summary, [o.key for o in s3.list(f"{root}/versions/")
                                      if o.key.endswith("/manifest.json")]))
    return sorted(out, key=lambda v: v["created_at"])


# -- commit --------------------------------------------------------------------------------------
@dataclass
class CommitResult:
    dataset: str
    version: str
    created: bool  # this run wrote the manifest
    ref_updated: bool  # this run moved refs/latest
    latest: str | None  # refs/latest afterwards
    parent: str | None
    rows: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0  # bytes of new objects this run uploaded (refreshed, existing ones not counted)
    bytes_total: int = 0  # bytes of every file the version lists
    shards_written: int = 0
    shards_reused: int = 0
    rows_deleted: int = 0  # rows of reused shards left out (recorded in the manifest)
    cas_retries: int = 0
    superseded_by: str | None = None  # refs/latest was left on a version from a newer snapshot
    parent_missing: list[str] = field(default_factory=list)  # parent files gone (not reused)
    repaired: list[str] = field(default_factory=list)  # files gone after the manifest, re-put


def _sort_key(row: SftRow) -> tuple:
    return (row["split"], row["prompt_id"], row["task_id"], row["annotation_id"], row["row_hash"])


def _put_fresh(s3: S3, key: str, data: bytes, content_type: str) -> int:
    """Upload a content-addressed object even when it exists (same key, same bytes): the put
    refreshes its age, so ``gc`` (which keeps objects younger than its min age) does not
    collect an orphan of a crashed run that this commit is about to reference. Returns the
    bytes of new content (0 for an object that existed: a refresh, not new data)."""
    existed = s3.head(key) is not None
    s3.put_bytes(key, data, content_type=content_type)
    return 0 if existed else len(data)


def _put_immutable(s3: S3, key: str, data: bytes, content_type: str) -> tuple[bytes, int]:
    """Create ``key`` once; when it exists already (an earlier, crashed run of the same
    version), keep its content and describe what is there. The existing object is put back
    (``If-Match`` its ETag: a concurrent writer's content is never replaced) to refresh its
    age for ``gc``. Returns (the bytes stored, bytes uploaded)."""
    try:
        s3.put_bytes(key, data, if_none_match=True, content_type=content_type)
        return data, len(data)
    except PreconditionFailed:
        existing, etag = s3.get_bytes(key)
        try:
            s3.put_bytes(key, existing, if_match=etag, content_type=content_type)
        except PreconditionFailed:  # rewritten meanwhile: describe what is there now
            existing, _ = s3.get_bytes(key)
        return existing, 0


def signature_bytes(sigs: np.ndarray) -> bytes:
    """A shard's signature sidecar: ``.npy`` of (rows, num_perm) uint32, in row order."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(sigs, dtype=np.uint32), allow_pickle=False)
    return buf.getvalue()


def read_signatures(data: bytes, rows: int) -> np.ndarray:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.dtype != np.uint32 or arr.ndim != 2 or len(arr) != rows:
        raise SftflowError(f"signature sidecar has shape {arr.shape} {arr.dtype}, "
                           f"not ({rows}, k) uint32")
    return arr


def _shard_row_hashes(s3: S3, key: str) -> list[str]:
    data, _ = s3.get_bytes(key)
    return pq.read_table(io.BytesIO(data), columns=["row_hash"]).column(0).to_pylist()


def _reusable(s3: S3, parent: Manifest, f: FileEntry) -> list[str] | None:
    """The row hashes of a parent shard, or None when it or one of its JSONL copies is gone."""
    try:
        hashes = _shard_row_hashes(s3, parent.key(f.path))
    except KeyError:
        return None
    if any(s3.head(parent.key(c.path)) is None for c in _companions(parent, f.sha256)):
        return None
    return hashes


#: A reused parent shard may lose at most this share of its rows (recorded as deleted);
#: past it, the shard's remaining rows are written anew.
MAX_DELETED = 0.25


def plan_shards(
    s3: S3, rows: Sequence[SftRow], parent: Manifest | None, shard_rows: int,
) -> tuple[list[FileEntry], dict[str, list[int]], list[list[SftRow]], list[str]]:
    """Which parent shards the new version reuses, which of their rows it leaves out, and the
    other rows cut into new shards. A parent shard is reused when its files all exist and at
    least ``1 - MAX_DELETED`` of its rows are still in the version with the same split: the
    rest are recorded as deleted (a small list in the manifest) instead of a rewrite. Small
    parent shards are merged into the new ones (bounded fragmentation). Returns (reused parquet
    entries, deleted positions per reused path, new shards as sorted row lists, paths of
    parent shards found missing: their rows are written anew)."""
    by_hash = {r["row_hash"]: r for r in rows}
    remaining = set(by_hash)
    reused: list[FileEntry] = []
    deleted: dict[str, list[int]] = {}
    missing: list[str] = []
    if parent:
        candidates = [f for f in parent.files_of("parquet")
                      if f.rows >= max(1, shard_rows // MERGE_BELOW)]
        with ThreadPoolExecutor(8) as pool:
            hashes = list(pool.map(lambda f: _reusable(s3, parent, f), candidates))
        for f, hs in zip(candidates, hashes, strict=True):
            if hs is None:
                missing.append(f.path)
                continue
            here = [h in remaining and by_hash[h]["split"] == f.split for h in hs]
            gone = [i for i, ok in enumerate(here) if not ok]
            if hs and len(gone) <= MAX_DELETED * len(hs) and len(gone) < len(hs):
                reused.append(f)
                if gone:
                    deleted[f.path] = gone
                remaining.difference_update(h for h, ok in zip(hs, here, strict=True) if ok)
    leftover = sorted((by_hash[h] for h in remaining), key=_sort_key)
    shards: list[list[SftRow]] = []
    for split in SPLITS:
        part = [r for r in leftover if r["split"] == split]
        shards += [part[i:i + shard_rows] for i in range(0, len(part), shard_rows)]
    return reused, deleted, shards, missing


def _companions(parent: Manifest | None, parquet_sha: str) -> list[FileEntry]:
    """The JSONL shard entries that were written with a reused parquet shard."""
    if not parent:
        return []
    return [f for f in parent.files if f.of == parquet_sha]


def _snapshot_of(s3: S3, root: str, version: str) -> str:
    """The Label Studio snapshot time a committed version was built from ("" if unknown)."""
    key = f"{root}/versions/{version}/manifest.json"
    try:
        data, _ = s3.get_bytes(key)
    except KeyError:
        return ""
    return str(Manifest.parse(data, root=root, where=s3.uri(key)).source.get("snapshot_at") or "")


class _Contention(Exception):
    """refs/latest changed between our read and our conditional write."""


def advance_latest(
    s3: S3, root: str, version: str, snapshot_at: str | None, *, max_attempts: int = 20,
    hook: Hook | None = None,
) -> tuple[bool, str | None, int, str | None]:
    """Move ``refs/latest`` to ``version`` with compare-and-swap, unless it names a version
    built from a newer snapshot. Returns (moved, latest afterwards, CAS retries, superseded_by)."""
    key = f"{root}/refs/latest"
    retries = 0

    def attempt() -> tuple[bool, str | None, int, str | None]:
        nonlocal retries
        current = _read_text(s3, key)
        if current and current[0] == version:
            return False, version, retries, None
        if current and snapshot_at:
            cur_snap = _snapshot_of(s3, root, current[0])
            if cur_snap and cur_snap > snapshot_at:
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


def _shard_files(shard: list[SftRow], system_prompt: str | None,
                 signatures: Mapping[str, np.ndarray] | None = None,
                 ) -> list[tuple[FileEntry, bytes, str]]:
    """A new shard's Parquet file, its two JSONL copies and (given ``signatures``, row hash ->
    MinHash signature) its signature sidecar: (entry, bytes, content type)."""
    split = shard[0]["split"]
    pq_bytes = formats.parquet_bytes(shard)
    pq_sha = sha256_hex(pq_bytes)
    out = [(FileEntry(path=f"shards/{pq_sha}.parquet", split=split, format="parquet",
                      sha256=pq_sha, size=len(pq_bytes), rows=len(shard)),
            pq_bytes, "application/vnd.apache.parquet")]
    for fmt, sub, data in (
        ("openai_chat", "openai", formats.openai_chat_jsonl(shard, system_prompt)),
        ("trl", "trl", formats.trl_jsonl(shard)),
    ):
        sha = sha256_hex(data)
        out.append((FileEntry(path=f"shards/{sub}/{sha}.jsonl", split=split, format=fmt,
                              sha256=sha, size=len(data), rows=len(shard), of=pq_sha),
                    data, "application/jsonl"))
    if signatures is not None:
        data = signature_bytes(np.stack([signatures[r["row_hash"]] for r in shard]))
        sha = sha256_hex(data)
        out.append((FileEntry(path=f"shards/minhash/{sha}.npy", split=split, format="minhash",
                              sha256=sha, size=len(data), rows=len(shard), of=pq_sha),
                    data, "application/octet-stream"))
    return out


def commit_version(
    s3: S3,
    dataset: str,
    rows: Sequence[SftRow],
    *,
    config: dict[str, Any],
    source: dict[str, Any],
    stats: dict[str, Any],
    exclusions: Sequence[Exclusion] = (),
    prefix: str = DEFAULT_PREFIX,
    shard_rows: int = 5000,
    run_id: str | None = None,
    code_version: str = "",
    system_prompt: str | None = None,
    hook: Hook | None = None,
    signatures: Mapping[str, np.ndarray] | None = None,
    extra_files: Sequence[tuple[str, str, bytes, str, int]] = (),
) -> CommitResult:
    """Write ``rows`` (each with every column of ``formats.SCHEMA``) as a version of ``dataset``
    and move ``refs/latest`` to it. Idempotent: the same rows and config give the same version,
    and a rerun after a crash at any point completes the commit.

    ``hook(step)`` and the failpoint ``versioning.after-<step>`` are called after each step
    (``shard``, ``files``, ``manifest``, ``ref``) so tests can stop the process exactly there.

    ``signatures`` (row hash -> MinHash signature) adds a signature sidecar to every new shard.
    ``extra_files`` are content-addressed (path, format, bytes, content type, rows) files the
    version lists (its task index and exclusion chunks); one the parent lists already is
    referenced, not uploaded. Without them, ``exclusions`` go to ``versions/<v>/exclusions.jsonl``."""
    root = dataset_root(prefix, dataset)

    def step(name: str) -> None:
        if hook:
            hook(name)
        failpoint(f"versioning.after-{name}")

    cfg_hash = config_hash(config)
    vid = version_id((r["row_hash"] for r in rows), cfg_hash)
    counts = Counter(r["split"] for r in rows)
    row_counts = {s: int(counts.get(s, 0)) for s in SPLITS}
    mkey = f"{root}/versions/{vid}/manifest.json"
    snapshot_at = source.get("snapshot_at")

    if s3.head(mkey) is not None:  # a rebuild of the same content, or a rerun past the manifest
        existing = _read_manifest(s3, root, dataset, vid)
        _require_files(s3, existing)
        moved, latest, retries, sup = advance_latest(s3, root, vid, snapshot_at, hook=hook)
        step("ref")
        return CommitResult(
            dataset=dataset, version=vid, created=False, ref_updated=moved, latest=latest,
            parent=existing.parent, rows=row_counts, bytes_written=0,
            bytes_total=sum(f.size for f in existing.files), cas_retries=retries,
            superseded_by=sup,
        )

    parent_id = latest_version(s3, dataset, prefix=prefix)
    parent = None
    if parent_id:
        try:
            parent = load_manifest(s3, dataset, parent_id, verify=False, prefix=prefix)
        except SftflowError as err:
            log.warning("parent %s@%s unreadable, building every shard anew: %s",
                        dataset, parent_id, err)
    reused, deleted, new_shards, parent_missing = plan_shards(s3, rows, parent, shard_rows)
    if parent_missing:
        log.warning("parent %s@%s: %d shard(s) missing, their rows are written anew: %s",
                    dataset, parent_id, len(parent_missing), ", ".join(parent_missing[:5]))

    files: list[FileEntry] = []
    written = 0
    for f in reused:
        files += [f, *_companions(parent, f.sha256)]
    own: dict[str, Callable[[], tuple[bytes, str]]] = {}  # what this run can re-put, by path

    def write_shard(shard: list[SftRow]) -> tuple[list[FileEntry], int]:
        parts = _shard_files(shard, system_prompt, signatures)
        return [e for e, _, _ in parts], sum(
            _put_fresh(s3, f"{root}/{e.path}", data, ctype) for e, data, ctype in parts)

    with ThreadPoolExecutor(4) as pool:
        for shard, (entries, n) in zip(new_shards, pool.map(write_shard, new_shards),
                                       strict=True):
            files += entries
            written += n
            for e in entries:
                own[e.path] = partial(_shard_bytes, shard, system_prompt, e.path, signatures)
            step("shard")

    split_order = {s: i for i, s in enumerate(SPLITS)}
    files.sort(key=lambda f: (split_order.get(f.split, 9), f.format, f.path))
    sizes = {s: sum(f.size for f in files if f.split == s and f.format == "parquet")
             for s in SPLITS}

    card = formats.dataset_card(dataset=dataset, version=vid, rows=row_counts, sizes=sizes,
                                stats=stats, source=source, config=config).encode()
    parent_files = {f.path: f for f in parent.files} if parent else {}
    for path, fmt, data, ctype, n_rows in extra_files:
        if path in parent_files and parent_files[path].sha256 == sha256_hex(data):
            files.append(parent_files[path])
            continue
        written += _put_fresh(s3, f"{root}/{path}", data, ctype)
        own[path] = partial(lambda b, c: (b, c), data, ctype)
        files.append(FileEntry(path=path, split=None, format=fmt, sha256=sha256_hex(data),
                               size=len(data), rows=n_rows))
    own_files = [("README.md", "card", card, "text/markdown", 0)]
    if not extra_files:
        own_files.insert(0, ("exclusions.jsonl", "exclusions",
                             formats.exclusions_jsonl(exclusions), "application/jsonl",
                             len(exclusions)))
    for name, fmt, data, ctype, n_rows in own_files:
        path = f"versions/{vid}/{name}"
        stored, n = _put_immutable(s3, f"{root}/{path}", data, ctype)
        written += n
        own[path] = partial(lambda b, c: (b, c), stored, ctype)
        files.append(FileEntry(path=path, split=None, format=fmt, sha256=sha256_hex(stored),
                               size=len(stored), rows=n_rows))
    step("files")

    manifest = Manifest(
        dataset=dataset, version=vid, parent=parent_id, root=root, created_at=utc_now_iso(),
        files=files, rows=row_counts, schema=formats.schema_json(), source=source, stats=stats,
        config=config, config_hash=cfg_hash, code_version=code_version, run_id=run_id,
        deleted=deleted,
    ).located(root)
    body = manifest.to_json()
    created = True
    try:
        s3.put_bytes(mkey, body, if_none_match=True, content_type="application/json")
        written += len(body)
    except PreconditionFailed:  # a concurrent build of the same content committed first
        created = False
        manifest = _read_manifest(s3, root, dataset, vid)
    step("manifest")
    repaired = _repair_files(s3, manifest, own)
    moved, latest, retries, sup = advance_latest(s3, root, vid, snapshot_at, hook=hook)
    step("ref")
    return CommitResult(
        dataset=dataset, version=vid, created=created, ref_updated=moved, latest=latest,
        parent=manifest.parent, rows=row_counts, bytes_written=written,
        bytes_total=sum(f.size for f in manifest.files),
        shards_written=len(new_shards), shards_reused=len(reused),
        rows_deleted=sum(len(v) for v in deleted.values()), cas_retries=retries,
        superseded_by=sup, parent_missing=parent_missing, repaired=repaired,
    )


def _shard_bytes(shard: list[SftRow], system_prompt: str | None, path: str,
                 signatures: Mapping[str, np.ndarray] | None = None) -> tuple[bytes, str]:
    """One of a new shard's files again (for a repair): its bytes and content type."""
    return next((data, ctype) for e, data, ctype in _shard_files(shard, system_prompt,
                                                                 signatures)
                if e.path == path)


def _missing_files(s3: S3, manifest: Manifest) -> list[FileEntry]:
    with ThreadPoolExecutor(8) as pool:
        gone = list(pool.map(lambda f: s3.head(manifest.key(f.path)) is None, manifest.files))
    return [f for f, g in zip(manifest.files, gone, strict=True) if g]


def _require_files(s3: S3, manifest: Manifest) -> None:
    """Refuse to point ``refs/latest`` at a version whose files are not all there."""
    missing = _missing_files(s3, manifest)
    if missing:
        raise SftflowError(
            f"{manifest.dataset}@{manifest.version}: {len(missing)} file(s) its manifest lists "
            f"are missing (first: {s3.uri(manifest.key(missing[0].path))}); refs/latest was "
            "not moved. Delete the version's manifest (it is not referenced) and rebuild."
        )


def _repair_files(s3: S3, manifest: Manifest,
                  own: Mapping[str, Callable[[], tuple[bytes, str]]]) -> list[str]:
    """After the manifest is written and before ``refs/latest`` moves: every listed file
    must exist (a ``gc`` that listed before the manifest existed may have deleted one).
    Files this run wrote are put back; any other missing file is a clear error."""
    repaired = []
    for f in _missing_files(s3, manifest):
        if f.path not in own:
            _require_files(s3, manifest)  # raises, naming the first missing file
        data, ctype = own[f.path]()
        if sha256_hex(data) != f.sha256:
            _require_files(s3, manifest)
        s3.put_bytes(manifest.key(f.path), data, content_type=ctype)
        repaired.append(f.path)
    if repaired:
        log.warning("%s@%s: %d file(s) were deleted during the commit, put back: %s",
                    manifest.dataset, manifest.version, len(repaired), ", ".join(repaired[:5]))
    return repaired


# -- readers: diff, pull, gc ---------------------------------------------------------------------
def _row_index(s3: S3, manifest: Manifest, files: Sequence[FileEntry],
               only: Callable[[FileEntry], set[int] | None] = lambda f: None,
               ) -> dict[str, tuple[str, int, str]]:
    """row_hash -> (split, annotation_id, prompt) for the version's rows in ``files``
    (deletions applied), or only at the positions ``only(f)`` names when it names some."""

    def read(f: FileEntry) -> list[tuple]:
        t = pq.read_table(io.BytesIO(read_file(s3, manifest, f)),
                          columns=["row_hash", "split", "annotation_id", "prompt"])
        keep = only(f)
        keep = sorted(keep) if keep is not None else kept_positions(manifest, f)
        t = t.take(pa.array(keep, type=pa.int64())) if len(keep) != t.num_rows else t
        return list(zip(*(t.column(i).to_pylist() for i in range(4)), strict=True))

    out = {}
    with ThreadPoolExecutor(8) as pool:
        for part in pool.map(read, files):
            out.update({h: (s, a, p) for h, s, a, p in part})
    return out


def diff_versions(s3: S3, dataset: str, a: str | None, b: str | None, *,
                  prefix: str = DEFAULT_PREFIX, examples: int = 3) -> dict[str, Any]:
    """Rows added, removed, changed (same annotation, new content) and unchanged from a to b,
    per split, and how many bytes of b's files a already had. Reads only the shards the two
    versions do not share, and the rows of shared shards that one of them deleted."""
    ma = load_manifest(s3, dataset, a, verify=False, prefix=prefix)
    mb = load_manifest(s3, dataset, b, verify=False, prefix=prefix)
    pa_, pb = ({f.path: f for f in m.files_of("parquet")} for m in (ma, mb))
    shared = pa_.keys() & pb.keys()

    def flips(m: Manifest, other: Manifest) -> Callable[[FileEntry], set[int] | None]:
        # rows of a shared shard present in m but deleted in other
        return lambda f: (set(other.deleted.get(f.path, ())) - set(m.deleted.get(f.path, ())))

    def index(m: Manifest, other: Manifest, own: dict) -> dict:
        idx = _row_index(s3, m, [f for p, f in own.items() if p not in shared])
        differ = [own[p] for p in shared
                  if set(m.deleted.get(p, ())) != set(other.deleted.get(p, ()))]
        idx.update(_row_index(s3, m, differ, flips(m, other)))
        return idx

    ra, rb = index(ma, mb, pa_), index(mb, ma, pb)
    unchanged = sum(len(kept_positions(mb, pb[p])) for p in shared) - sum(
        len(set(ma.deleted.get(p, ())) - set(mb.deleted.get(p, ()))) for p in shared)
    ann_a = {v[1]: h for h, v in ra.items()}
    added = [h for h in rb if h not in ra]
    removed = [h for h in ra if h not in rb]
    changed = [h for h in added if rb[h][1] in ann_a and ann_a[rb[h][1]] in removed]
    changed_old = {ann_a[rb[h][1]] for h in changed}
    added_only = [h for h in added if h not in set(changed)]
    removed_only = [h for h in removed if h not in changed_old]
    unchanged += len(rb) - len(added)

    def per_split(hs: list[str], idx: dict) -> dict[str, int]:
        c = Counter(idx[h][0] for h in hs)
        return {s: c.get(s, 0) for s in SPLITS}

    paths_a = {f.path for f in ma.files}
    shared_bytes = sum(f.size for f in mb.files if f.path in paths_a)
    return {
        "dataset": dataset, "a": ma.version, "b": mb.version,
        "rows_a": ma.rows, "rows_b": mb.rows,
        "added": per_split(added_only, rb), "removed": per_split(removed_only, ra),
        "changed": per_split(changed, rb),
        "unchanged": unchanged,
        "shards_read": len(pa_.keys() - shared) + len(pb.keys() - shared),
        "bytes_b": sum(f.size for f in mb.files), "bytes_shared_with_a": shared_bytes,
        "examples": {
            "added": [rb[h][2][:120] for h in sorted(added_only)[:examples]],
            "removed": [ra[h][2][:120] for h in sorted(removed_only)[:examples]],
        },
    }


def _inside(dest: Path, relative: str, manifest: Manifest) -> Path:
    """``dest / relative``, refused unless it resolves inside ``dest``."""
    base = dest.resolve()
    out = dest / relative
    if not out.resolve().is_relative_to(base) or out.resolve() == base:
        raise SftflowError(
            f"{manifest.dataset}@{manifest.version}: file {relative!r} resolves outside "
            f"{dest} ({out.resolve()}); nothing was downloaded"
        )
    return out


def pull_version(s3: S3, dataset: str, version: str | None, dest: str | Path, *,
                 prefix: str = DEFAULT_PREFIX, license: str = hub.DEFAULT_LICENSE,
                 ) -> dict[str, Any]:
    """Download a version into ``dest`` as a Hub dataset repository (``tasks/versions/hub.py``:
    layout and card), checksums verified, files written atomically. Every file's destination
    must resolve inside ``dest`` (symlinks followed), or nothing is downloaded (SftflowError
    naming the file)."""
    manifest = load_manifest(s3, dataset, version, verify=False, prefix=prefix)
    dest = Path(dest)
    files = hub.pulled_files(manifest.files)
    targets = {f.path: _inside(dest, hub.local_path(f), manifest) for f in files}

    def fetch(f: FileEntry) -> int:
        out = targets[f.path]
        trimmed = bool(manifest.deleted.get(manifest.shard_of(f)))
        if (not trimmed and out.is_file() and out.stat().st_size == f.size
                and sha256_hex(out.read_bytes()) == f.sha256):
            return 0
        data = version_bytes(s3, manifest, f)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(out)
        return len(data)

    with ThreadPoolExecutor(8) as pool:
        downloaded = sum(pool.map(fetch, files))
    _inside(dest, "manifest.json", manifest).write_bytes(manifest.to_json())
    card = hub.write_card(_inside(dest, hub.CARD, manifest).parent, manifest, license=license)
    return {"dataset": dataset, "version": manifest.version, "dir": str(dest),
            "files": len(files) + 1, "bytes_downloaded": downloaded, "card": card}


def _referenced(s3: S3, root: str, manifest_keys: Iterable[str]) -> set[str]:
    """The object keys the manifests at ``manifest_keys`` reference (themselves included),
    located under ``root``, the root being collected, never the root written in a manifest."""
    out = set()
    for key in manifest_keys:
        m = Manifest.parse(s3.get_bytes(key)[0], root=root, where=s3.uri(key))
        out.add(key)
        out.update(m.key(f.path) for f in m.files)
    return out


def _manifest_keys(s3: S3, root: str) -> set[str]:
    return {o.key for o in s3.list(f"{root}/versions/") if o.key.endswith("/manifest.json")}


def gc(s3: S3, dataset: str, *, prefix: str = DEFAULT_PREFIX, dry_run: bool = True,
       min_age_s: float = 3600.0) -> dict[str, Any]:
    """Objects under the dataset root that no manifest and no ref references, older than
    ``min_age_s``. Deleted unless dry run. A manifest that does not validate stops the
    collection (nothing is deleted). References resolve under the root collected.

    Safe beside a build: a commit re-puts every object it is about to reference (its age
    restarts), and right before deleting, gc re-reads the manifests (a commit may have written
    one since the listing) and checks each candidate's age again. What is left, a build
    writing its manifest within the instant between that check and the delete, is repaired by
    the build's own check of its files after its manifest (``commit_version``)."""
    root = dataset_root(prefix, dataset)
    objects = list(s3.list(f"{root}/"))
    manifests = {o.key for o in objects if o.key.endswith("/manifest.json")
                 and o.key.startswith(f"{root}/versions/")}
    referenced = _referenced(s3, root, manifests)
    cutoff = utc_now() - timedelta(seconds=min_age_s)

    live = {k.split("/")[-2] for k in manifests}

    def collectable(o: ObjectInfo) -> bool:
        if o.key.startswith(f"{root}/derived/"):  # trimmed copies live as long as their version
            return o.key[len(root) + 9:].split("/", 1)[0] not in live
        return (o.key not in referenced and not o.key.startswith(f"{root}/refs/")
                and (o.last_modified is None or o.last_modified <= cutoff))

    garbage = [o for o in objects if collectable(o)]
    young = [o for o in objects if o.key not in referenced and o not in garbage
             and not o.key.startswith(f"{root}/refs/")]
    deleted = 0
    if not dry_run and garbage:
        failpoint("gc.before-delete")
        referenced |= _referenced(s3, root, _manifest_keys(s3, root) - manifests)
        cutoff = utc_now() - timedelta(seconds=min_age_s)
        with ThreadPoolExecutor(8) as pool:
            now = list(pool.map(lambda o: s3.head(o.key), garbage))
        doomed = [o.key for o in now if o is not None and collectable(o)]
        deleted = s3.delete(doomed) if doomed else 0
    return {
        "dataset": dataset, "dry_run": dry_run, "versions": len(manifests),
        "objects": len(objects), "unreferenced": len(garbage),
        "unreferenced_bytes": sum(o.size for o in garbage),
        "kept_too_young": len(young), "deleted": deleted,
        "keys": [o.key for o in garbage[:50]],
    }
