"""The rows a version stores: fresh rows deduplicated against the parent's retained rows and
each other (``dedup.stable_dedup``), the survivors finalised (cluster id, split, row hash),
and the task index updated. Pure: no services.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from sftflow.tasks.build.changes import Changes
from sftflow.tasks.build.incremental import (
    TaskRecord,
    exclusion_files,
    inherited_splits,
    record,
    task_index_files,
    touched_chunks,
)
from sftflow.tasks.build.plan import Plan
from sftflow.tasks.dedup import DedupConfig, Fingerprints
from sftflow.tasks.dedup.stable import stable_dedup
from sftflow.tasks.runtime.declare import compute_task
from sftflow.tasks.versions import formats
from sftflow.tasks.versions.commit import ExtraFile
from sftflow.tasks.versions.rows import Exclusion, SftRow


def _hex(key: int) -> str:
    return f"{int(key) & 0xFFFFFFFFFFFFFFFF:016x}"


def retained_rows(plan: Plan, reread: set[int]) -> tuple[list[SftRow], np.ndarray]:
    """The parent's rows whose tasks are not read again, and their signatures."""
    keep = [i for i, r in enumerate(plan.parent.rows) if r["task_id"] not in reread]
    return [plan.parent.rows[i] for i in keep], plan.parent.sigs[keep]


@dataclass
class Outcome:
    """The rows a version stores and everything written beside them."""

    rows: list[SftRow]
    signatures: dict[str, np.ndarray]
    exclusions: list[Exclusion]  # this build's own (fresh tasks)
    stats: dict[str, Any]
    tasks: dict[int, TaskRecord]  # the new task index
    figures: dict[str, int]  # rows added, removed, changed; tasks read


def stable_split(plan: Plan, changes: Changes, fresh: Sequence[SftRow],
                 fps: Sequence[Fingerprints], cfg: DedupConfig, eval_fraction: float,
                 split_seed: int) -> Outcome:
    """Fresh rows against the retained ones (``dedup.stable_dedup``), the survivors finalised
    (cluster id, split, row hash), the task index updated."""
    retained, r_sigs = retained_rows(plan, changes.reread)
    order = sorted(range(len(fresh)), key=lambda i: (fresh[i]["task_id"],
                                                      fresh[i]["annotation_id"]))
    fresh = [fresh[i] for i in order]
    k = cfg.num_perm
    fp = Fingerprints.concat(fps) if fps else Fingerprints(np.zeros((0, k), np.uint32),
                                                           np.zeros(0, np.int64))
    fp = Fingerprints(fp.sigs[order], fp.keys[order]) if len(fp) else fp
    res = stable_dedup(retained, r_sigs.reshape(len(retained), k), fresh, fp, cfg,
                       eval_fraction=eval_fraction, seed=split_seed,
                       inherited=inherited_splits(plan.parent.tasks, changes.reread))
    kept: list[SftRow] = []
    sigs = {r["row_hash"]: s for r, s in zip(retained, r_sigs, strict=True)}
    splits: dict[int, set[str]] = {}
    twins: dict[int, set[str]] = {}
    exclusions: list[Exclusion] = []
    for i, row in enumerate(fresh):
        tid = int(row["task_id"])
        if res.split[i]:
            splits.setdefault(tid, set()).add(res.split[i])
        if res.keep[i]:
            out = cast(SftRow, {c: row[c] for c in formats.COLUMNS if c in row})
            out["cluster_id"] = _hex(int(fp.keys[i]))
            out["split"] = res.split[i]
            out["row_hash"] = formats.row_hash(out)
            kept.append(out)
            sigs[out["row_hash"]] = fp.sigs[i]
        else:
            twin = _hex(int(res.twin[i]))
            twins.setdefault(tid, set()).add(twin)
            exclusions.append({
                "stage": "dedup", "reason": "duplicate", "task_id": tid,
                "annotation_id": row["annotation_id"], "cluster_id": twin,
                "detail": ("exact" if res.exact[i] else "near") + (
                    " duplicate of a row of the parent version" if res.against_parent[i]
                    else " duplicate of a new row")})
    tasks = {t: r for t, r in plan.parent.tasks.items()
             if t not in changes.reread and t not in changes.deleted}
    for t in changes.reread - changes.deleted:
        if t in changes.states:
            s = splits.get(t, set())
            tasks[t] = record(changes.states[t], ("train" if "train" in s else "eval")
                              if s else None, twins.get(t, ()))
    for t, st in changes.states.items():  # a full export: unchanged tasks not yet indexed
        if t not in tasks and t not in changes.deleted:
            tasks[t] = record(st)
    had_rows = {r["task_id"] for r in plan.parent.rows if r["task_id"] in changes.reread}
    new_tasks = {r["task_id"] for r in kept}
    figures = {
        "tasks_read": changes.count_read(),
        "tasks_deleted": len(changes.deleted),
        "rows_exported": len(fresh),
        "rows_added": sum(1 for r in kept if r["task_id"] not in had_rows),
        "rows_changed": sum(1 for r in kept if r["task_id"] in had_rows),
        "rows_removed": sum(1 for r in plan.parent.rows
                            if r["task_id"] in had_rows and r["task_id"] not in new_tasks),
        "rows_retained": len(retained),
    }
    return Outcome(retained + kept, sigs, exclusions, res.stats, tasks, figures)


def index_files(plan: Plan, changes: Changes, tasks: Mapping[int, TaskRecord],
                exclusions: Iterable[Exclusion]) -> list[ExtraFile]:
    """The version's task index and exclusions, in content-addressed chunks. A chunk holding
    no task this build read again, deleted or saw change is the parent's, reused as read
    (serialising and redacting every chunk again cost 1.5 s a build at 55k tasks)."""
    touched = touched_chunks(changes.reread | changes.deleted | set(changes.states))
    reuse = plan.parent.chunks
    return (task_index_files(tasks.values(), reuse, touched)
            + exclusion_files(exclusions, reuse, touched))


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
stable_split_task = compute_task(name="stable-dedup-and-split")(stable_split)
