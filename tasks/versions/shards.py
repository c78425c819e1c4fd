"""Shards: how a version's rows become content-addressed files, and which of its parent's shards
a new version reuses.

A new shard is a Parquet file, its two JSONL copies (OpenAI chat, TRL) and, when the build
computed MinHash signatures, a signature sidecar (``.npy``, one row per shard row); each is
named by its sha256 (``keys.shard_path`` and siblings) and shared by every version that lists
it. ``plan_shards`` reuses a parent shard whose files all exist and whose rows mostly stay in
the version, recording the rows that left as deleted (``Manifest.deleted``) instead of a
rewrite; the other rows are cut into new shards.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from sftflow.core.errors import SftflowError
from sftflow.core.hashing import sha256_hex
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.versions import formats
from sftflow.tasks.versions.keys import copy_path, shard_path, sidecar_path
from sftflow.tasks.versions.manifest import SPLITS, FileEntry, Manifest

if TYPE_CHECKING:
    from sftflow.tasks.versions.rows import SftRow

#: Parent shards with fewer rows than ``shard_rows // MERGE_BELOW`` are merged, not reused.
MERGE_BELOW = 4
#: A reused parent shard may lose at most this share of its rows (recorded as deleted);
#: past it, the shard's remaining rows are written anew.
MAX_DELETED = 0.25


# -- the signature sidecar -----------------------------------------------------------------------
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


# -- a new shard's files -------------------------------------------------------------------------
def shard_files(shard: list[SftRow], system_prompt: str | None,
                signatures: Mapping[str, np.ndarray] | None = None,
                ) -> list[tuple[FileEntry, bytes, str]]:
    """A new shard's Parquet file, its two JSONL copies and (given ``signatures``, row hash ->
    MinHash signature) its signature sidecar: (entry, bytes, content type)."""
    split = shard[0]["split"]
    pq_bytes = formats.parquet_bytes(shard)
    pq_sha = sha256_hex(pq_bytes)
    out = [(FileEntry(path=shard_path(pq_sha), split=split, format="parquet",
                      sha256=pq_sha, size=len(pq_bytes), rows=len(shard)),
            pq_bytes, "application/vnd.apache.parquet")]
    for fmt, sub, data in (
        ("openai_chat", "openai", formats.openai_chat_jsonl(shard, system_prompt)),
        ("trl", "trl", formats.trl_jsonl(shard)),
    ):
        sha = sha256_hex(data)
        out.append((FileEntry(path=copy_path(sub, sha), split=split, format=fmt,
                              sha256=sha, size=len(data), rows=len(shard), of=pq_sha),
                    data, "application/jsonl"))
    if signatures is not None:
        data = signature_bytes(np.stack([signatures[r["row_hash"]] for r in shard]))
        sha = sha256_hex(data)
        out.append((FileEntry(path=sidecar_path(sha), split=split, format="minhash",
                              sha256=sha, size=len(data), rows=len(shard), of=pq_sha),
                    data, "application/octet-stream"))
    return out


def shard_bytes(shard: list[SftRow], system_prompt: str | None, path: str,
                signatures: Mapping[str, np.ndarray] | None = None) -> tuple[bytes, str]:
    """One of a new shard's files again (for a repair): its bytes and content type."""
    return next((data, ctype) for e, data, ctype in shard_files(shard, system_prompt,
                                                                signatures)
                if e.path == path)


# -- reusing the parent's shards -----------------------------------------------------------------
def companions(parent: Manifest | None, parquet_sha: str) -> list[FileEntry]:
    """The JSONL shard entries that were written with a reused parquet shard."""
    if not parent:
        return []
    return [f for f in parent.files if f.of == parquet_sha]


def _sort_key(row: SftRow) -> tuple:
    return (row["split"], row["prompt_id"], row["task_id"], row["annotation_id"], row["row_hash"])


def _shard_row_hashes(s3: S3, key: str) -> list[str]:
    data, _ = s3.get_bytes(key)
    return pq.read_table(io.BytesIO(data), columns=["row_hash"]).column(0).to_pylist()


def _reusable(s3: S3, parent: Manifest, f: FileEntry) -> list[str] | None:
    """The row hashes of a parent shard, or None when it or one of its JSONL copies is gone."""
    try:
        hashes = _shard_row_hashes(s3, parent.key(f.path))
    except KeyError:
        return None
    if any(s3.head(parent.key(c.path)) is None for c in companions(parent, f.sha256)):
        return None
    return hashes


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
