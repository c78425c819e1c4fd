"""What a build carries from its parent version: the task index, the exclusions, the rows and
their MinHash signatures; and which tasks a build must look at again.

Every version stores, beside its shards:

- the *task index* (format ``tasks``): one record per Label Studio task the version has seen,
  with its state fingerprint (``delta.task_state``), its annotation counts (what ``reconcile``
  checks against the project counters), the split of its rows, and the keys of the kept rows
  its dropped rows duplicate (``twins``);
- the *exclusions* (format ``exclusions``), every dropped row with its reason;
- per Parquet shard, a *signature sidecar* (format ``minhash``, ``of`` = the shard): the MinHash
  signatures of the shard's rows in row order (LSH band keys are recomputed from them, about
  10 ms per 10k rows).

Index and exclusions are cut in chunks of ``TASK_CHUNK`` consecutive task ids and stored by
content (``index/<sha256>.…``), so a version rewrites only the chunks whose tasks changed, and
the sidecars are shared with their shards.

A build re-reads a task when it is new or its state changed (``changed_tasks``), when it was
deleted, or when its row was dropped as the duplicate of a row that has since left
(``orphan_tasks``). Every other task keeps its parent outcome: kept rows stay, dropped rows
stay dropped, filtered rows stay filtered.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sftflow.core.hashing import sha256_hex
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.build.delta import TaskState
from sftflow.tasks.versions import formats
from sftflow.tasks.versions.commit import ExtraFile
from sftflow.tasks.versions.keys import index_path
from sftflow.tasks.versions.read import kept_positions, read_file
from sftflow.tasks.versions.shards import read_signatures

if TYPE_CHECKING:
    from sftflow.tasks.versions.manifest import Manifest
    from sftflow.tasks.versions.rows import Exclusion, SftRow

#: Consecutive task ids per chunk of the task index and of the exclusions.
TASK_CHUNK = 4096


class TaskRecord(TypedDict):
    task_id: int
    state: str
    n_annotations: int
    n_cancelled: int
    split: str | None  # the split of the task's kept rows, or of the row its rows duplicate
    twins: str  # comma-separated cluster ids of the kept rows its dropped rows duplicate
    updated_at: str  # the task's updated_at when it was read ("" if unknown)


_TASK_SCHEMA = pa.schema([
    ("task_id", pa.int64()), ("state", pa.string()), ("n_annotations", pa.int32()),
    ("n_cancelled", pa.int32()), ("split", pa.string()), ("twins", pa.string()),
    ("updated_at", pa.string()),
])


def record(state: TaskState, split: str | None = None, twins: Iterable[str] = ()) -> TaskRecord:
    return TaskRecord(task_id=state.task_id, state=state.state,
                      n_annotations=state.n_annotations, n_cancelled=state.n_cancelled,
                      split=split, twins=",".join(sorted(set(twins))),
                      updated_at=state.updated_at)


def as_state(rec: TaskRecord) -> TaskState:
    return TaskState(rec["task_id"], rec["state"], rec["n_annotations"], rec["n_cancelled"],
                     rec.get("updated_at") or "")


# -- chunks ---------------------------------------------------------------------------------------
def _chunk_of(task_id: int | None) -> int:
    return -1 if task_id is None else int(task_id) // TASK_CHUNK


#: A parent's chunk files by (format, chunk): what a build reuses for the chunks none of whose
#: tasks it read again (the same records, so the same bytes a fresh write would give).
ChunkFiles = Mapping[tuple[str, int], ExtraFile]


def task_index_files(records: Iterable[TaskRecord], reuse: ChunkFiles | None = None,
                     touched: set[int] | None = None) -> list[ExtraFile]:
    """The task index cut in chunks: one Parquet file per chunk; a chunk not ``touched`` is
    ``reuse``d as the parent wrote it (no ``touched``: every chunk is written)."""
    by_chunk: dict[int, list[TaskRecord]] = {}
    for r in records:
        by_chunk.setdefault(_chunk_of(r["task_id"]), []).append(r)
    out = []
    for chunk, recs in sorted(by_chunk.items()):
        if (kept := _reused(reuse, touched, "tasks", chunk)) is not None:
            out.append(kept)
            continue
        recs.sort(key=lambda r: r["task_id"])
        table = pa.Table.from_pylist(list(recs), schema=_TASK_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        out.append(ExtraFile(index_path(sha256_hex(data), "parquet"), "tasks", data,
                             "application/vnd.apache.parquet", len(recs)))
    return out


def exclusion_files(exclusions: Iterable[Exclusion], reuse: ChunkFiles | None = None,
                    touched: set[int] | None = None) -> list[ExtraFile]:
    """The exclusions cut in chunks of task ids (secrets and PII redacted, see
    ``formats.exclusions_jsonl``): one JSONL file per chunk; a chunk not ``touched`` is
    ``reuse``d as the parent wrote it."""
    by_chunk: dict[int, list[Exclusion]] = {}
    for e in exclusions:
        by_chunk.setdefault(_chunk_of(e.get("task_id")), []).append(e)
    out = []
    for chunk, ex in sorted(by_chunk.items()):
        if (kept := _reused(reuse, touched, "exclusions", chunk)) is not None and \
                kept.rows == len(ex):
            out.append(kept)
            continue
        ex.sort(key=lambda e: (e.get("task_id") or 0, e.get("annotation_id") or 0,
                               e["stage"], e["reason"]))
        data = formats.exclusions_jsonl(ex)
        out.append(ExtraFile(index_path(sha256_hex(data), "jsonl"), "exclusions", data,
                             "application/jsonl", len(ex)))
    return out


def _reused(reuse: ChunkFiles | None, touched: set[int] | None, fmt: str,
            chunk: int) -> ExtraFile | None:
    if reuse is None or touched is None or chunk < 0 or chunk in touched:
        return None
    return reuse.get((fmt, chunk))


def touched_chunks(task_ids: Iterable[int]) -> set[int]:
    """The chunks holding these tasks: the ones a build writes again."""
    return {_chunk_of(t) for t in task_ids}


# -- the parent's state ---------------------------------------------------------------------------
@dataclass
class ParentState:
    """A parent version as the next build needs it (deletions applied)."""

    version: str
    rows: list[SftRow] = field(default_factory=list)
    sigs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    tasks: dict[int, TaskRecord] = field(default_factory=dict)
    exclusions: list[Exclusion] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    #: its task index and exclusion chunk files as read, by (format, chunk)
    chunks: dict[tuple[str, int], ExtraFile] = field(default_factory=dict)
    _states: dict[int, TaskState] | None = field(default=None, repr=False, compare=False)

    def states(self) -> dict[int, TaskState]:
        """The task index as ``TaskState``s (built once: 55k of them take 0.3 s)."""
        if self._states is None:
            self._states = {t: as_state(r) for t, r in self.tasks.items()}
        return self._states


def incremental_ready(manifest: Manifest) -> str | None:
    """None when a version carries what an incremental build needs; else why not."""
    parquet = manifest.files_of("parquet")
    sidecars = {f.of for f in manifest.files_of("minhash")}
    if not manifest.files_of("tasks"):
        return f"parent {manifest.version} has no task index (built by an older sftflow)"
    if any(f.sha256 not in sidecars for f in parquet):
        return f"parent {manifest.version} lacks MinHash sidecars for some shards"
    if not manifest.source.get("watermark"):
        return f"parent {manifest.version} records no watermark"
    return None


def load_parent(s3: S3, manifest: Manifest) -> ParentState:
    """Rows, signatures, task index and exclusions of ``manifest`` (checksums verified)."""
    sidecar = {f.of: f for f in manifest.files_of("minhash")}
    shards = manifest.files_of("parquet")

    def shard(f: Any) -> tuple[list[SftRow], np.ndarray]:
        keep = kept_positions(manifest, f)
        table = pq.read_table(io.BytesIO(read_file(s3, manifest, f)))
        sigs = read_signatures(read_file(s3, manifest, sidecar[f.sha256]), f.rows)
        rows = table.to_pylist()
        return [rows[i] for i in keep], sigs[keep]

    chunks: dict[tuple[str, int], ExtraFile] = {}

    def keep(f: Any, data: bytes, content_type: str, first_task: int | None) -> None:
        chunks[(f.format, _chunk_of(first_task))] = ExtraFile(f.path, f.format, data,
                                                              content_type, f.rows)

    def tasks(f: Any) -> list[TaskRecord]:
        data = read_file(s3, manifest, f)
        recs = pq.read_table(io.BytesIO(data)).to_pylist()
        keep(f, data, "application/vnd.apache.parquet", recs[0]["task_id"] if recs else None)
        return recs

    def excl(f: Any) -> list[Exclusion]:
        data = read_file(s3, manifest, f)
        recs = [json.loads(line) for line in data.splitlines() if line]
        keep(f, data, "application/jsonl", recs[0].get("task_id") if recs else None)
        return recs

    with ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(shard, shards))
        index = [r for part in pool.map(tasks, manifest.files_of("tasks")) for r in part]
        exclusions = [e for part in pool.map(excl, manifest.files_of("exclusions")) for e in part]
    k = int(manifest.config.get("dedup", {}).get("num_perm", 128))
    return ParentState(
        version=manifest.version,
        rows=[r for rows, _ in parts for r in rows],
        sigs=np.concatenate([s for _, s in parts]) if parts else np.zeros((0, k), np.uint32),
        tasks={int(r["task_id"]): r for r in index},
        exclusions=exclusions,
        source=dict(manifest.source),
        chunks=chunks,
    )


# -- what to read again ---------------------------------------------------------------------------
def changed_tasks(parent: Mapping[int, TaskRecord], states: Mapping[int, TaskState],
                  deleted: Iterable[int] = ()) -> set[int]:
    """Tasks new, changed (another state) or deleted since the parent."""
    out = {t for t, s in states.items() if t not in parent or parent[t]["state"] != s.state}
    return out | {t for t in deleted if t in parent}


def orphan_tasks(parent: Mapping[int, TaskRecord], changed: set[int],
                 retained_keys: set[str]) -> set[int]:
    """Unchanged tasks whose rows were dropped as duplicates of a row no longer kept."""
    return {t for t, r in parent.items() if t not in changed and r["twins"]
            and any(k not in retained_keys for k in r["twins"].split(","))}


def inherited_splits(parent: Mapping[int, TaskRecord], tasks: Iterable[int]) -> dict[int, str]:
    """The split each re-read task had in the parent (its rows', or its twins')."""
    return {t: s for t in tasks if (s := (parent.get(t) or {}).get("split"))}
