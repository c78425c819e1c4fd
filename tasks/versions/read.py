"""Readers of committed versions: manifests resolved and loaded, files checksum-verified, rows
with the version's deletions applied, listings, the baseline a trigger counts from, and the
diff of two versions.

Readers trust only refs and manifests and verify checksums (``read_file``). A reused shard may
hold rows its manifest records as deleted: every reader of rows leaves them out
(``kept_positions``).

Listings (``scan_datasets``, ``scan_versions``) read every manifest they list as a reader of it
would, and a manifest that does not read (not JSON, refused by the ``Manifest`` model, a path
leaving its dataset, another version's manifest) is named in ``damaged`` (dataset, key,
reason) while the others are listed: one damaged object never hides a bucket's datasets.
``list_versions`` is the strict reader: it raises, naming every damaged manifest.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sftflow.core.errors import SftflowError
from sftflow.core.hashing import sha256_hex
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.runtime.declare import io_task
from sftflow.tasks.versions.keys import DEFAULT_PREFIX, DatasetKeys, datasets_listing, is_name
from sftflow.tasks.versions.manifest import SPLITS, FileEntry, Manifest, manifest_at, read_manifest
from sftflow.tasks.versions.refs import latest_version, read_latest, resolve_at


# -- files and rows ------------------------------------------------------------------------------
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


def verify_files(s3: S3, manifest: Manifest, files: Sequence[FileEntry] | None = None) -> None:
    """Download every listed file and check size and sha256; SftflowError names the first bad one."""

    def check(f: FileEntry) -> None:
        read_file(s3, manifest, f)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(check, files if files is not None else manifest.files))


def data_files(s3: S3, manifest: Manifest, split: str | None, fmt: str = "parquet") -> list[str]:
    """s3:// URIs of the version's files of one split and format, in manifest order."""
    return [s3.uri(manifest.key(f.path)) for f in manifest.files_of(fmt, split)]


# -- manifests -----------------------------------------------------------------------------------
def load_manifest_at(s3: S3, keys: DatasetKeys, dataset: str, version: str | None = None,
                     verify: bool = True) -> Manifest:
    """``load_manifest`` for a dataset whose keys are ``keys``."""
    version = resolve_at(s3, keys, dataset, version)
    manifest = read_manifest(s3, keys.root, dataset, version)
    if verify:
        verify_files(s3, manifest)
    return manifest


def load_manifest(
    s3: S3, dataset: str, version: str | None = None, verify: bool = True, *,
    prefix: str = DEFAULT_PREFIX,
) -> Manifest:
    """The validated manifest of ``version`` (an id or a tag; None: ``refs/latest``), its
    files verified. A manifest that names a file outside the dataset root, an unknown split
    or another version is refused (SftflowError naming it)."""
    return load_manifest_at(s3, DatasetKeys.of(prefix, dataset), dataset, version, verify)


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
    base = datasets_listing(prefix)
    names = []
    for page in s3.client.get_paginator("list_objects_v2").paginate(
        Bucket=s3.bucket, Prefix=base, Delimiter="/"
    ):
        for cp in page.get("CommonPrefixes", []):
            names.append(cp["Prefix"][len(base):].rstrip("/"))
    return sorted(n for n in names if is_name(n))


@dataclass(frozen=True)
class DamagedManifest:
    """A manifest in the bucket that does not read as its version: named by a listing, never
    fatal to it. ``key``: the object key; ``reason``: why it was refused."""

    dataset: str
    key: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class VersionListing:
    """``scan_versions``: the readable versions, oldest first, and the damaged manifests."""

    versions: list[dict[str, Any]] = field(default_factory=list)
    damaged: list[DamagedManifest] = field(default_factory=list)


@dataclass
class DatasetListing:
    """``scan_datasets``: each dataset with its latest version and rows (None when the latest
    manifest is damaged), and the damaged manifests."""

    datasets: list[dict[str, Any]] = field(default_factory=list)
    damaged: list[DamagedManifest] = field(default_factory=list)


def _listed_manifest(s3: S3, keys: DatasetKeys, dataset: str, key: str) -> Manifest:
    """The manifest at ``key`` as a reader reads it: validated, and describing the very
    version its key names (SftflowError otherwise; KeyError when it is gone)."""
    m = manifest_at(s3, key, keys.root)
    version = DatasetKeys.version_of_manifest(key)
    if (m.dataset, m.version) != (dataset, version):
        raise SftflowError(f"manifest {s3.uri(key)} is refused: it describes "
                           f"{m.dataset}@{m.version}, not {dataset}@{version}")
    return m


def _damage(s3: S3, dataset: str, key: str, err: SftflowError) -> DamagedManifest:
    reason = str(err).removeprefix(f"manifest {s3.uri(key)} ").removeprefix("is ")
    return DamagedManifest(dataset, key, reason)


def scan_versions(s3: S3, dataset: str, *, prefix: str = DEFAULT_PREFIX) -> VersionListing:
    """Every committed version (a manifest exists), oldest first, with summary fields; the
    manifests that do not read are named in ``damaged`` instead."""
    keys = DatasetKeys.of(prefix, dataset)

    def summary(key: str) -> dict[str, Any] | DamagedManifest | None:
        try:
            m = _listed_manifest(s3, keys, dataset, key)
        except KeyError:
            return None  # deleted since the listing
        except SftflowError as err:
            return _damage(s3, dataset, key, err)
        return {"version": m.version, "parent": m.parent, "created_at": m.created_at,
                "rows": m.rows, "run_id": m.run_id, "snapshot_at": m.source.get("snapshot_at")}

    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(summary, [o.key for o in s3.list(keys.versions)
                                      if keys.is_manifest(o.key)]))
    return VersionListing(
        versions=sorted((v for v in out if isinstance(v, dict)), key=lambda v: v["created_at"]),
        damaged=sorted((d for d in out if isinstance(d, DamagedManifest)), key=lambda d: d.key))


def list_versions(s3: S3, dataset: str, *, prefix: str = DEFAULT_PREFIX) -> list[dict[str, Any]]:
    """Every committed version, oldest first, with summary fields (``scan_versions``); strict:
    a damaged manifest is an SftflowError naming every one."""
    listing = scan_versions(s3, dataset, prefix=prefix)
    if listing.damaged:
        raise SftflowError(f"dataset {dataset!r}: {len(listing.damaged)} damaged manifest(s): "
                           + "; ".join(f"{s3.uri(d.key)}: {d.reason}" for d in listing.damaged))
    return listing.versions


def _latest(s3: S3, keys: DatasetKeys, dataset: str,
            ) -> tuple[str | None, dict[str, int] | DamagedManifest]:
    """``(refs/latest, the rows of its version)``; ``(None, {})`` before the first version;
    instead of the rows, what is damaged: that manifest, or the ref when it names none."""
    try:
        latest = read_latest(s3, keys)
    except UnicodeDecodeError:
        return None, DamagedManifest(dataset, keys.latest, "refs/latest is not text")
    if latest is None:
        return None, {}
    if not is_name(latest):
        return None, DamagedManifest(dataset, keys.latest,
                                     f"refs/latest holds no version id ({latest[:40]!r})")
    key = keys.manifest(latest)
    try:
        return latest, _listed_manifest(s3, keys, dataset, key).rows
    except KeyError:
        return latest, DamagedManifest(dataset, key, f"missing: refs/latest names {latest}, "
                                                     "which has no manifest")
    except SftflowError as err:
        return latest, _damage(s3, dataset, key, err)


def scan_datasets(s3: S3, *, prefix: str = DEFAULT_PREFIX) -> DatasetListing:
    """Every dataset with its latest version and that version's rows (read from its manifest
    only; ``scan_versions`` reads them all). A latest manifest that does not read, or a
    ``refs/latest`` naming none, is named in ``damaged``; its dataset is listed, rows None."""
    listing = DatasetListing()
    for name in list_datasets(s3, prefix=prefix):
        latest, rows = _latest(s3, DatasetKeys.of(prefix, name), name)
        if isinstance(rows, DamagedManifest):
            listing.damaged.append(rows)
        listing.datasets.append({"dataset": name, "latest": latest,
                                 "rows": None if isinstance(rows, DamagedManifest) else rows})
    return listing


# -- diff ----------------------------------------------------------------------------------------
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
