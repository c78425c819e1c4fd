"""The pure stages of a dataset build between the export and the commit.

Filter results are merged, rows are fingerprinted per shard, deduplicated and split into
train/eval by cluster (``dedup_and_split``: the final rows a version stores), and the
figures the build reports are put in shape. No services: the ``build_dataset`` flow calls
these, the Prefect task aliases map them over shards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np

from sftflow.tasks import formats
from sftflow.tasks._prefect import compute_task
from sftflow.tasks.dedup import (
    DedupConfig,
    Fingerprints,
    assign_splits,
    dedup_text,
    deduplicate,
    fingerprint,
)
from sftflow.tasks.filters import FilterResult
from sftflow.tasks.labelstudio.export import Exclusion, SftRow

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
    """The rows every filtered shard kept, the export's exclusions followed by the filters',
    and the filter counts added up."""
    rows: list[SftRow] = []
    excluded = list(exclusions)
    counts: Counter = Counter()
    for res in results:
        rows += res.kept
        excluded += res.excluded
        counts.update(res.counts)
    return rows, excluded, counts


def dedup_texts(rows: Iterable[SftRow], cfg: DedupConfig) -> list[str]:
    return [dedup_text(r["prompt"], r["completion"], cfg) for r in rows]


#: ``dedup.fingerprint`` as a Prefect task, mapped over shards of dedup texts.
fingerprint_shard = compute_task(name="fingerprint-shard")(fingerprint)


@dataclass
class DedupSplit:
    rows: list[SftRow]  # kept rows with cluster_id, split and row_hash: what the version stores
    exclusions: list[Exclusion] = field(default_factory=list)  # the duplicates dropped
    stats: dict[str, Any] = field(default_factory=dict)  # dedup summary, examples, split figures


def _hex(key: int) -> str:
    return f"{int(key) & 0xFFFFFFFFFFFFFFFF:016x}"


def dedup_and_split(
    rows: Sequence[SftRow], fps: Sequence[Fingerprints], cfg: DedupConfig,
    eval_fraction: float, split_seed: int,
) -> DedupSplit:
    """Deduplicate ``rows`` (fingerprinted per shard in ``fps``) and split the survivors.

    A kept row's stored ``cluster_id`` is its own content key (the hash of its normalised
    dedup text), not the cluster's smallest member key: a new near-duplicate that joins the
    cluster later (and loses the keep rule) then changes neither the kept row nor its split,
    so the row's shard is reused by the next version."""
    fp = Fingerprints.concat(fps)
    result = deduplicate(rows, cfg, fingerprints=fp)
    kept_idx = np.flatnonzero(result.keep)
    rep_key = fp.keys[kept_idx]
    rep_of_cluster = dict(zip(result.cluster_id[kept_idx].tolist(), rep_key.tolist(),
                              strict=True))
    split = assign_splits(rep_key, result.cluster_id[kept_idx],
                          [rows[i]["prompt_id"] for i in kept_idx], eval_fraction, split_seed)
    final: list[SftRow] = []
    for i, key, ev in zip(kept_idx.tolist(), rep_key.tolist(), split.is_eval.tolist(),
                          strict=True):
        row = cast(SftRow, {c: rows[i][c] for c in formats.COLUMNS if c in rows[i]})
        row["cluster_id"] = _hex(key)
        row["split"] = "eval" if ev else "train"
        row["row_hash"] = formats.row_hash(row)
        final.append(row)
    exclusions: list[Exclusion] = [
        # The kept twin (same cluster_id) is in the data: no text copied, the file stays small.
        {"stage": "dedup", "reason": "duplicate", "task_id": rows[i]["task_id"],
         "annotation_id": rows[i]["annotation_id"],
         "cluster_id": _hex(rep_of_cluster[int(result.cluster_id[i])])}
        for i in np.flatnonzero(~result.keep).tolist()
    ]
    stats = {
        **result.summary(),
        "examples": result.examples,
        "split_groups": split.groups,
        "leakage_clusters": split.leakage_clusters,
        "leakage_prompts": split.leakage_prompts,
    }
    return DedupSplit(final, exclusions, stats)


#: ``dedup_and_split`` as a Prefect task (one run on the driver).
dedup_and_split_task = compute_task(name="dedup-and-split")(dedup_and_split)


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
