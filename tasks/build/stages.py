"""The pure stages of a dataset build between the export and the commit.

Filter results are merged, rows are fingerprinted per shard, deduplicated against the
parent's rows and split into train/eval by cluster (``stable_split``: the final rows a version
stores), and the figures the build reports are put in shape. No services: the ``build_dataset`` flow calls
these, the Prefect task aliases map them over shards.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import numpy as np

from sftflow.core.hashing import config_hash
from sftflow.tasks.adapters.labelstudio import PROMPT_NAME
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.build.delta import (
    TaskState,
    fetch_tasks_task,
    find_deleted_task,
    list_task_ids_task,
    ls_time,
    reconcile,
    task_state,
    watermark,
)
from sftflow.tasks.build.export import iter_json_array
from sftflow.tasks.build.filters import FilterResult
from sftflow.tasks.build.incremental import (
    ParentState,
    TaskRecord,
    changed_tasks,
    exclusion_files,
    incremental_ready,
    inherited_splits,
    load_parent,
    orphan_tasks,
    record,
    task_index_files,
)
from sftflow.tasks.dedup import (
    DedupConfig,
    Fingerprints,
    dedup_text,
    fingerprint,
)
from sftflow.tasks.dedup.stable import stable_dedup
from sftflow.tasks.runtime.declare import compute_task
from sftflow.tasks.versions import formats
from sftflow.tasks.versions.commit import ExtraFile
from sftflow.tasks.versions.read import load_manifest
from sftflow.tasks.versions.refs import latest_version
from sftflow.tasks.versions.rows import Exclusion, SftRow

T = TypeVar("T")

#: Label Studio project counters recorded with every version (the next build's baseline).
PROJECT_COUNTERS = ("task_number", "num_tasks_with_annotations", "total_annotations_number",
                    "finished_task_number", "skipped_annotations_number")


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """``items`` cut into shards of ``size`` (one empty shard for no items)."""
    return [items[i:i + size] for i in range(0, len(items), size)] or [items[:0]]


def project_source(labelstudio_url: str, project: Any) -> dict[str, Any]:
    """The manifest's ``source`` record of a Label Studio project (before the snapshot)."""
    return {
        "labelstudio_url": labelstudio_url,
        "project_id": int(project.id),
        "project_title": project.title,
        **{k: int(getattr(project, k, 0) or 0) for k in PROJECT_COUNTERS},
    }


def merge_filtered(
    exclusions: Iterable[Exclusion], results: Iterable[FilterResult]
) -> tuple[list[SftRow], list[Exclusion], Counter]:
    """The rows every filtered shard kept, the given exclusions followed by the filters', and
    the filter counts added up. A given exclusion of stage ``filter`` (a row the draft policy
    left out before the shards were filtered) counts as a filter drop by its reason."""
    rows: list[SftRow] = []
    excluded = list(exclusions)
    counts: Counter = Counter(f"dropped:{e['reason']}" for e in excluded if e["stage"] == "filter")
    for res in results:
        rows += res.kept
        excluded += res.excluded
        counts.update(res.counts)
    return rows, excluded, counts


def dedup_texts(rows: Iterable[SftRow], cfg: DedupConfig) -> list[str]:
    return [dedup_text(r["prompt"], r["completion"], cfg) for r in rows]


#: ``dedup.fingerprint`` as a Prefect task, mapped over shards of dedup texts.
fingerprint_task = compute_task(name="fingerprint-shard")(fingerprint)


def _hex(key: int) -> str:
    return f"{int(key) & 0xFFFFFFFFFFFFFFFF:016x}"


def dedup_counts(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The dedup figures of the build report: the summary less its examples, with each drop
    reason as ``dropped:<reason>``."""
    return {k: v for k, v in stats.items() if k not in ("examples", "dropped")} | {
        f"dropped:{k}": v for k, v in stats["dropped"].items()}


def counts_table(counts: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of the build's counts artifact: stage, count, value."""
    table = []
    for stage in ("export", "filters", "dedup"):
        for key, value in sorted((counts.get(stage) or {}).items()):
            if isinstance(value, int | float):
                table.append({"stage": stage, "count": key, "value": value})
    for split, n in (counts.get("rows") or {}).items():
        table.append({"stage": "version", "count": f"rows_{split}", "value": n})
    return table


def nothing_to_build(project_title: str, counts: Mapping[str, Any]) -> str:
    return (
        f"no version made: project {project_title!r} has no usable annotations "
        f"({(counts.get('export') or {}).get('annotations', 0)} annotations exported, "
        f"{(counts.get('filters') or {}).get('kept', 0)} rows passed the filters)"
    )


def version_markdown(report: Mapping[str, Any], examples: Iterable[Mapping[str, Any]]) -> str:
    """The version artifact: where the manifest is, rows, bytes, and dedup examples.
    ``report`` holds the build report's fields."""
    r = report
    lines = [
        f"# {r['dataset']} @ `{r['version']}`",
        "",
        f"Manifest: `{r['uri']}`  ",
        f"Created: {r['created']}; refs/latest: `{r['latest']}`; parent: `{r['parent']}`",
        "",
        f"Rows: {r['rows']}. Bytes written {r['bytes_written']:,} of {r['bytes_total']:,}.",
        "",
        "## Dedup examples (clusters removed)",
    ]
    for ex in examples:
        lines += ["", (f"- cluster `{ex['cluster_id']}` ({ex['size']} rows), kept: "
                      f"{ex['kept']['text']!r}")]
        lines += [f"  - dropped ({d['reason']}): {d['text']!r}" for d in ex["dropped"]]
    return "\n".join(lines)


# -- incremental builds --------------------------------------------------------------------------
BuildMode = Literal["incremental", "full", "scratch"]


@dataclass
class Stopwatch:
    """Seconds per named stage of a build (reported in ``--json`` and the artifact)."""

    seconds: dict[str, float] = field(default_factory=dict)
    _t: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._t, 3)
        self._t = now


@dataclass
class Plan:
    """What a build starts from: its parent (empty for a first build or a scratch build),
    the mode asked for, and why."""

    mode: BuildMode
    reason: str
    parent: ParentState
    since_full: int = 0  # builds since the last full export, this one included


def plan_build(s3: S3, dataset: str, prefix: str, config: Mapping[str, Any], *,
               mode: Literal["auto", "full", "scratch"], full_every: int) -> Plan:
    """The parent version and the mode: ``scratch`` without a usable parent (none, another
    build config, or one without a task index), ``full`` when asked or every ``full_every``
    builds, else ``incremental`` (which may still fall back to full, see ``read_changes``)."""
    latest = latest_version(s3, dataset, prefix=prefix)
    if latest is None:
        return Plan("scratch", "first version", ParentState(version=""))
    manifest = load_manifest(s3, dataset, latest, verify=False, prefix=prefix)
    if mode == "scratch":
        return Plan("scratch", "asked for (--scratch)", ParentState(version=""))
    if manifest.config_hash != config_hash(dict(config)):
        return Plan("scratch", f"build config differs from parent {latest}'s",
                    ParentState(version=""))
    if (why := incremental_ready(manifest)) is not None:
        return Plan("scratch", why, ParentState(version=""))
    parent = load_parent(s3, manifest)
    since = int(parent.source.get("since_full", 0) or 0) + 1
    if mode == "full":
        return Plan("full", "asked for (--full)", parent, 0)
    if since >= full_every:
        return Plan("full", f"every {full_every} builds", parent, 0)
    return Plan("incremental", "", parent, since)


@dataclass
class Changes:
    """The tasks a build reads again, and what it learnt about the project."""

    mode: BuildMode
    reason: str
    tasks: list[dict[str, Any]]  # the tasks to parse (changed, new, orphaned), whole
    states: dict[int, TaskState]  # current states of those tasks (all tasks on a full export)
    deleted: set[int]
    reread: set[int]  # changed or deleted or orphaned: their parent rows leave
    watermark: str
    export: dict[str, Any] = field(default_factory=dict)  # snapshot id and time, requests


def _reread(plan: Plan, states: Mapping[int, TaskState], deleted: set[int]) -> set[int]:
    changed = changed_tasks(plan.parent.tasks, states, deleted)
    kept = {r["cluster_id"] for r in plan.parent.rows if r["task_id"] not in changed}
    return changed | orphan_tasks(plan.parent.tasks, changed, kept)


def read_changes(ls: Any, project_id: int, plan: Plan, counters: Callable[[], dict[str, int]],
                 full_export: Callable[[], Path], *, prompt_name: str = PROMPT_NAME) -> Changes:
    """The incremental export (tasks updated since the parent's watermark, checked against
    the project counters, deleted tasks found by listing ids when the counts say some are
    gone); a full export (``full_export()``: a downloaded snapshot) when the mode is not
    incremental or the counters do not reconcile."""
    reason = plan.reason
    if plan.mode == "incremental":
        clock = Stopwatch()  # its laps show where an incremental export's seconds go
        before = counters()
        clock.lap("counters")
        seen = fetch_tasks_task(ls, project_id, updated_after=plan.parent.source["watermark"],
                           light=True)
        clock.lap("list")
        known = plan.parent.tasks
        stale = sorted(int(t["id"]) for t in seen.tasks if int(t["id"]) not in known
                       or not known[int(t["id"])].get("updated_at")
                       or known[int(t["id"])]["updated_at"] != ls_time(t.get("updated_at")))
        delta = fetch_tasks_task(ls, project_id, ids=stale)
        delta.server_time = seen.server_time
        clock.lap("fetch")
        now = counters()
        clock.lap("counters")
        states = {int(t["id"]): task_state(t, prompt_name) for t in delta.tasks}
        deleted: set[int] = set()
        why = "the project changed during the reading" if now != before else reconcile(
            plan.parent.states(), states, deleted, now)
        if why and now == before:
            expected = set(plan.parent.tasks) | set(states)
            found = find_deleted_task(ls, project_id, expected)
            deleted = found if found is not None else expected - list_task_ids_task(ls, project_id)
            why = reconcile(plan.parent.states(), states, deleted, now)
            clock.lap("deleted")
        if not why:
            reread = _reread(plan, states, deleted)
            orphans = sorted(reread - set(states) - deleted)
            extra = fetch_tasks_task(ls, project_id, ids=orphans).tasks if orphans else []
            clock.lap("fetch")
            states.update({int(t["id"]): task_state(t, prompt_name) for t in extra})
            by_id = {int(t["id"]): t for t in delta.tasks + extra}
            return Changes("incremental", "", [by_id[t] for t in sorted(reread) if t in by_id],
                           states, deleted, reread, watermark(delta.server_time),
                           {"requests": seen.requests + delta.requests,
                            "tasks_listed": len(seen.tasks), "tasks_fetched": len(delta.tasks),
                            "seconds": clock.seconds})
        reason = f"counters do not reconcile ({why})"
    path = full_export()
    with path.open("rb") as fp:
        states = {int(t["id"]): task_state(t, prompt_name) for t in iter_json_array(fp)
                  if isinstance(t, dict)}
    deleted = set(plan.parent.tasks) - set(states)
    reread = _reread(plan, states, deleted) if plan.parent.version else set(states)
    with path.open("rb") as fp:
        tasks = [t for t in iter_json_array(fp)
                 if not isinstance(t, dict) or int(t.get("id") or 0) in reread]
    mode: BuildMode = "scratch" if not plan.parent.version else "full"
    return Changes(mode, reason, tasks, states, deleted, reread, "")


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
        "tasks_read": len(changes.tasks),
        "tasks_deleted": len(changes.deleted),
        "rows_exported": len(fresh),
        "rows_added": sum(1 for r in kept if r["task_id"] not in had_rows),
        "rows_changed": sum(1 for r in kept if r["task_id"] in had_rows),
        "rows_removed": sum(1 for r in plan.parent.rows
                            if r["task_id"] in had_rows and r["task_id"] not in new_tasks),
        "rows_retained": len(retained),
    }
    return Outcome(retained + kept, sigs, exclusions, res.stats, tasks, figures)


#: ``stable_split`` as a Prefect task (one run on the driver).
stable_split_task = compute_task(name="stable-dedup-and-split")(stable_split)


def carried_exclusions(plan: Plan, changes: Changes) -> list[Exclusion]:
    """The parent's exclusions of tasks this build did not read again."""
    gone = changes.reread | changes.deleted
    return [e for e in plan.parent.exclusions if e.get("task_id") not in gone]


def index_files(tasks: Mapping[int, TaskRecord], exclusions: Iterable[Exclusion],
                ) -> list[ExtraFile]:
    """The version's task index and exclusions, in content-addressed chunks."""
    return task_index_files(tasks.values()) + exclusion_files(exclusions)
