"""The commit protocol: rows -> an immutable, content-addressed dataset version, and
``refs/latest`` moved to it.

What to commit is one ``CommitRequest``; the files a version lists beside its shards (chunks
of the task index and of the exclusions) are ``ExtraFile``s.

Protocol: (1) upload shards (even when they exist: the same bytes, a refreshed age for
``gc``) and the version's own files, (2) write ``manifest.json`` with ``If-None-Match: *`` and
check that every file it lists exists (put back what a concurrent ``gc`` deleted), (3) move
``refs/latest`` with ``If-Match`` on its ETag, re-reading and retrying on 412
(``refs.advance_latest``). Readers trust only refs and manifests and verify checksums, so a
crash before (2) leaves unreferenced objects (``gc`` removes them) and a crash between (2)
and (3) leaves a complete version that a rerun points ``refs/latest`` at. ``refs/latest``
never moves to a version built from an older Label Studio read than the one it names: the
request's ``source`` carries the watermark of what the build read (``refs.read_mark``),
recorded in the manifest and compared by the compare-and-swap; it is not part of the version
id.

The version id is a hash of the rows and the build configuration (``manifest.version_id``):
the same request commits the same version, and an unchanged rebuild writes nothing.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from sftflow.core.clock import utc_now_iso
from sftflow.core.errors import SftflowError
from sftflow.core.failpoints import failpoint
from sftflow.core.hashing import config_hash, sha256_hex
from sftflow.tasks.adapters.s3 import S3, PreconditionFailed
from sftflow.tasks.runtime.declare import io_task
from sftflow.tasks.versions import formats
from sftflow.tasks.versions.keys import DEFAULT_PREFIX, DatasetKeys, version_path
from sftflow.tasks.versions.manifest import SPLITS, FileEntry, Manifest, read_manifest, version_id
from sftflow.tasks.versions.read import load_manifest_at
from sftflow.tasks.versions.refs import Hook, advance_latest, read_latest, read_mark
from sftflow.tasks.versions.shards import companions, plan_shards, shard_bytes, shard_files

if TYPE_CHECKING:
    from sftflow.tasks.versions.rows import Exclusion, SftRow

log = logging.getLogger(__name__)


# -- the request and the result ------------------------------------------------------------------
@dataclass(frozen=True)
class ExtraFile:
    """A content-addressed file a version lists beside its shards (a chunk of the task index or
    of the exclusions): its path under the dataset root, manifest format, bytes, content type
    and row count. One the parent lists already (same path and sha256) is referenced, not
    uploaded."""

    path: str
    format: str
    data: bytes = field(repr=False)
    content_type: str
    rows: int


@dataclass(frozen=True, kw_only=True)
class CommitRequest:
    """What ``commit_version`` writes: ``rows`` (each with every column of ``formats.SCHEMA``)
    as a version of ``dataset`` under ``prefix``, described by the build ``config`` (hashed into
    the version id), the Label Studio ``source`` (its ``watermark``, the time of the read,
    orders concurrent commits: ``refs.read_mark``; not hashed) and ``stats``. ``signatures``
    (row hash -> MinHash signature) adds a signature sidecar to every new shard. Without
    ``extra_files``, ``exclusions`` go to ``versions/<v>/exclusions.jsonl``."""

    dataset: str
    rows: Sequence[SftRow]
    config: dict[str, Any]
    source: dict[str, Any]
    stats: dict[str, Any]
    exclusions: Sequence[Exclusion] = ()
    prefix: str = DEFAULT_PREFIX
    shard_rows: int = 5000
    run_id: str | None = None
    code_version: str = ""
    system_prompt: str | None = None
    signatures: Mapping[str, np.ndarray] | None = None
    extra_files: Sequence[ExtraFile] = ()


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
    superseded_by: str | None = None  # refs/latest was left on a version read later
    parent_missing: list[str] = field(default_factory=list)  # parent files gone (not reused)
    repaired: list[str] = field(default_factory=list)  # files gone after the manifest, re-put


# -- one commit in progress ----------------------------------------------------------------------
@dataclass
class _Commit:
    """A commit under way: its request, keys and version id, and what it wrote so far."""

    s3: S3
    request: CommitRequest
    hook: Hook | None
    keys: DatasetKeys
    vid: str = ""
    cfg_hash: str = ""
    read_at: str = ""  # when the rows were read from Label Studio (``refs.read_mark``)
    row_counts: dict[str, int] = field(default_factory=dict)
    files: list[FileEntry] = field(default_factory=list)
    #: What this run can put back if it goes missing before ``refs/latest`` moves, by path.
    own: dict[str, Callable[[], tuple[bytes, str]]] = field(default_factory=dict)
    written: int = 0  # bytes of new objects uploaded

    def step(self, name: str) -> None:
        if self.hook:
            self.hook(name)
        failpoint(f"versioning.after-{name}")

    def advance(self) -> tuple[bool, str | None, int, str | None]:
        return advance_latest(self.s3, self.keys.root, self.vid, self.read_at, hook=self.hook)


def _as_is(data: bytes, content_type: str) -> tuple[bytes, str]:
    return data, content_type


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


# -- the protocol --------------------------------------------------------------------------------
def commit_version(s3: S3, request: CommitRequest, *, hook: Hook | None = None) -> CommitResult:
    """Write ``request.rows`` as a version of ``request.dataset`` and move ``refs/latest`` to
    it. Idempotent: the same rows and config give the same version, and a rerun after a crash
    at any point completes the commit.

    ``hook(step)`` and the failpoint ``versioning.after-<step>`` are called after each step
    (``shard``, ``files``, ``manifest``, ``ref``) so tests can stop the process exactly there."""
    run = _Commit(s3, request, hook, DatasetKeys.of(request.prefix, request.dataset))
    run.cfg_hash = config_hash(request.config)
    run.vid = version_id((r["row_hash"] for r in request.rows), run.cfg_hash)
    counts = Counter(r["split"] for r in request.rows)
    run.row_counts = {s: int(counts.get(s, 0)) for s in SPLITS}
    run.read_at = read_mark(request.source)  # this build's read, even for an existing version
    if s3.head(run.keys.manifest(run.vid)) is not None:
        return _recommit(run)  # a rebuild of the same content, or a rerun past the manifest

    parent_id, parent = _parent(run)
    reused, deleted, new_shards, parent_missing = plan_shards(
        s3, request.rows, parent, request.shard_rows)
    if parent_missing:
        log.warning("parent %s@%s: %d shard(s) missing, their rows are written anew: %s",
                    request.dataset, parent_id, len(parent_missing),
                    ", ".join(parent_missing[:5]))
    _write_shards(run, parent, reused, new_shards)
    _write_version_files(run, parent)
    manifest, created = _write_manifest(run, parent_id, deleted)
    repaired = _repair_files(s3, manifest, run.own)
    moved, latest, retries, sup = run.advance()
    run.step("ref")
    return CommitResult(
        dataset=request.dataset, version=run.vid, created=created, ref_updated=moved,
        latest=latest, parent=manifest.parent, rows=run.row_counts, bytes_written=run.written,
        bytes_total=sum(f.size for f in manifest.files),
        shards_written=len(new_shards), shards_reused=len(reused),
        rows_deleted=sum(len(v) for v in deleted.values()), cas_retries=retries,
        superseded_by=sup, parent_missing=parent_missing, repaired=repaired,
    )


def _recommit(run: _Commit) -> CommitResult:
    """The version's manifest exists: check its files, then only move ``refs/latest``."""
    existing = read_manifest(run.s3, run.keys.root, run.request.dataset, run.vid)
    _require_files(run.s3, existing)
    moved, latest, retries, sup = run.advance()
    run.step("ref")
    return CommitResult(
        dataset=run.request.dataset, version=run.vid, created=False, ref_updated=moved,
        latest=latest, parent=existing.parent, rows=run.row_counts, bytes_written=0,
        bytes_total=sum(f.size for f in existing.files), cas_retries=retries,
        superseded_by=sup,
    )


def _parent(run: _Commit) -> tuple[str | None, Manifest | None]:
    """``refs/latest`` and its manifest (None when unreadable: every shard is built anew)."""
    dataset = run.request.dataset
    parent_id = read_latest(run.s3, run.keys)
    parent = None
    if parent_id:
        try:
            parent = load_manifest_at(run.s3, run.keys, dataset, parent_id, verify=False)
        except SftflowError as err:
            log.warning("parent %s@%s unreadable, building every shard anew: %s",
                        dataset, parent_id, err)
    return parent_id, parent


def _write_shards(run: _Commit, parent: Manifest | None, reused: list[FileEntry],
                  new_shards: list[list[SftRow]]) -> None:
    """List the reused parent shards (and their copies); upload the new ones (step ``shard``
    after each)."""
    s3, req = run.s3, run.request
    for f in reused:
        run.files += [f, *companions(parent, f.sha256)]

    def write_shard(shard: list[SftRow]) -> tuple[list[FileEntry], int]:
        parts = shard_files(shard, req.system_prompt, req.signatures)
        return [e for e, _, _ in parts], sum(
            _put_fresh(s3, run.keys.key(e.path), data, ctype) for e, data, ctype in parts)

    with ThreadPoolExecutor(4) as pool:
        for shard, (entries, n) in zip(new_shards, pool.map(write_shard, new_shards),
                                       strict=True):
            run.files += entries
            run.written += n
            for e in entries:
                run.own[e.path] = partial(shard_bytes, shard, req.system_prompt, e.path,
                                          req.signatures)
            run.step("shard")


def _write_version_files(run: _Commit, parent: Manifest | None) -> None:
    """Order the shard entries; upload the extra files the parent lacks, then the version's
    own card (and exclusions, without extra files), step ``files``."""
    req = run.request
    split_order = {s: i for i, s in enumerate(SPLITS)}
    run.files.sort(key=lambda f: (split_order.get(f.split, 9), f.format, f.path))
    sizes = {s: sum(f.size for f in run.files if f.split == s and f.format == "parquet")
             for s in SPLITS}
    card = formats.dataset_card(dataset=req.dataset, version=run.vid, rows=run.row_counts,
                                sizes=sizes, stats=req.stats, source=req.source,
                                config=req.config).encode()
    parent_files = {f.path: f for f in parent.files} if parent else {}
    for extra in req.extra_files:
        sha = sha256_hex(extra.data)
        if extra.path in parent_files and parent_files[extra.path].sha256 == sha:
            run.files.append(parent_files[extra.path])
            continue
        run.written += _put_fresh(run.s3, run.keys.key(extra.path), extra.data,
                                  extra.content_type)
        run.own[extra.path] = partial(_as_is, extra.data, extra.content_type)
        run.files.append(FileEntry(path=extra.path, split=None, format=extra.format,
                                   sha256=sha, size=len(extra.data), rows=extra.rows))
    own_files = [ExtraFile(version_path(run.vid, "README.md"), "card", card, "text/markdown", 0)]
    if not req.extra_files:
        own_files.insert(0, ExtraFile(version_path(run.vid, "exclusions.jsonl"), "exclusions",
                                      formats.exclusions_jsonl(req.exclusions),
                                      "application/jsonl", len(req.exclusions)))
    for own in own_files:
        stored, n = _put_immutable(run.s3, run.keys.key(own.path), own.data, own.content_type)
        run.written += n
        run.own[own.path] = partial(_as_is, stored, own.content_type)
        run.files.append(FileEntry(path=own.path, split=None, format=own.format,
                                   sha256=sha256_hex(stored), size=len(stored), rows=own.rows))
    run.step("files")


def _write_manifest(run: _Commit, parent_id: str | None,
                    deleted: dict[str, list[int]]) -> tuple[Manifest, bool]:
    """Write the manifest once (``If-None-Match: *``), step ``manifest``. Returns the version's
    manifest (a concurrent build's, when it committed the same content first) and whether
    this run wrote it."""
    req, root = run.request, run.keys.root
    manifest = Manifest(
        dataset=req.dataset, version=run.vid, parent=parent_id, root=root,
        created_at=utc_now_iso(), files=run.files, rows=run.row_counts,
        schema=formats.schema_json(), source=req.source, stats=req.stats, config=req.config,
        config_hash=run.cfg_hash, code_version=req.code_version, run_id=req.run_id,
        deleted=deleted,
    ).located(root)
    body = manifest.to_json()
    created = True
    try:
        run.s3.put_bytes(run.keys.manifest(run.vid), body, if_none_match=True,
                         content_type="application/json")
        run.written += len(body)
    except PreconditionFailed:  # a concurrent build of the same content committed first
        created = False
        manifest = read_manifest(run.s3, root, req.dataset, run.vid)
    run.step("manifest")
    return manifest, created


# -- every listed file there before refs/latest moves --------------------------------------------
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


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
commit_version_task = io_task(name="commit-version")(commit_version)
