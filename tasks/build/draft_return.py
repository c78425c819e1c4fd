"""Draft return: how many seconds of annotator time each drafting model saved, and whose.

Acceptance and edit similarity (``sftflow.tasks.drafts.figures``, from the row fields of
``sftflow.tasks.build.edits``) say how often a draft survives, not how much time it saved.
Label Studio records both halves of that on every annotation made in its editor:
``lead_time`` (seconds the annotator spent on it) and ``parent_prediction`` (the draft it
started from, a row's ``draft_model``). This module turns them into seconds saved, from the
rows of one build (one project, the period the build read: ``period``) and their lead times
(``ParsedExport.lead_times``, annotation id -> seconds or None).

Like for like. A long prompt takes longer whatever the draft, so drafted annotations are
compared with undrafted ones of the same prompt length: prompts fall in power-of-two buckets
of characters (``BUCKET_EDGES``); in each bucket b holding both, the median lead time with a
draft (``with_b``) and without one (``without_b``, the *baseline*). A group's (a model's, an
annotator's) figures weight the buckets by where the group's drafted annotations are (n_b of
its n compared):

    median_with_draft_s    = sum_b n_b/n x with_b
    median_without_draft_s = sum_b n_b/n x without_b
    saved_per_task_s       = their difference
    saved_total_s          = saved_per_task_s x n = sum_b n_b x (without_b - with_b)

A model is compared with everyone's undrafted work in the bucket; an annotator with their own
(annotators differ in speed: "whose time did drafts save?" asks each against themselves).

Never guessed. An annotation without a ``lead_time`` (made through the API, not in the editor)
is counted apart (``untimed``, ``untimed_drafted``) and in no median; a drafted annotation in
a bucket with no undrafted baseline is counted as ``no_baseline``, not compared; a group with
nothing compared has ``saved_*`` None. Pure: no services; the figures are JSON-ready, for
``manifest.stats["drafts"]["return"]`` (the version card renders them:
``formats.draft_return_section``).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sftflow.tasks.runtime.declare import artifact_key, io_task
from sftflow.tasks.versions.rows import SftRow

#: Lower edges of the prompt-length buckets, in characters; the last bucket is open.
BUCKET_EDGES: tuple[int, ...] = (0, 64, 128, 256, 512, 1024, 2048, 4096)
#: Acceptance figures shown beside the seconds (from ``drafts.figures.model_figures``).
ACCEPTANCE_KEYS = ("accepted_unchanged", "acceptance_rate", "mean_similarity",
                   "mean_similarity_edited")
METHOD = ("Label Studio lead_time (seconds spent in the editor) of annotations started from a "
          "draft (parent_prediction) against those written without one, within prompt-length "
          "buckets, weighted by the drafted annotations' buckets; models against everyone's "
          "undrafted work, annotators against their own; annotations without lead_time "
          "counted apart")


def length_bucket(chars: int, edges: Sequence[int] = BUCKET_EDGES) -> int:
    """The index of the bucket of a prompt of ``chars`` characters."""
    return max(i for i, edge in enumerate(edges) if chars >= edge or i == 0)


def bucket_label(index: int, edges: Sequence[int] = BUCKET_EDGES) -> str:
    if index + 1 < len(edges):
        return f"{edges[index]}-{edges[index + 1] - 1}"
    return f"{edges[index]}+"


def lead_time(value: Any) -> float | None:
    """Seconds from a Label Studio ``lead_time``, or None when there is none to trust."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def _round(x: float | None, places: int = 1) -> float | None:
    return None if x is None else round(x, places)


def _medians(samples: Mapping[int, list[float]]) -> dict[int, float]:
    return {b: statistics.median(xs) for b, xs in samples.items() if xs}


def _group(drafted: Mapping[int, list[float]], untimed: int, baseline: Mapping[int, float],
           beside: Mapping[str, Any] | None) -> dict[str, Any]:
    """One model's or annotator's figures: its drafted lead times by bucket against the
    ``baseline`` bucket medians (see the module docstring)."""
    compared = {b: xs for b, xs in drafted.items() if xs and b in baseline}
    n = sum(map(len, compared.values()))
    with_s = without_s = None
    if n:
        with_s = sum(len(xs) / n * statistics.median(xs) for xs in compared.values())
        without_s = sum(len(xs) / n * baseline[b] for b, xs in compared.items())
    saved = None if with_s is None or without_s is None else without_s - with_s
    timed = sum(map(len, drafted.values()))
    return {
        "annotations": timed + untimed, "untimed": untimed, "no_baseline": timed - n,
        "compared": n, "median_with_draft_s": _round(with_s),
        "median_without_draft_s": _round(without_s), "saved_per_task_s": _round(saved),
        "saved_total_s": _round(None if saved is None else saved * n),
        **{k: (beside or {}).get(k) for k in ACCEPTANCE_KEYS},
    }


def draft_return(
    rows: Iterable[SftRow], lead_times: Mapping[int, float | None], *,
    models: Mapping[str, Mapping[str, Any]] | None = None,
    annotators: Mapping[str, Mapping[str, Any]] | None = None,
    edges: Sequence[int] = BUCKET_EDGES,
) -> dict[str, Any]:
    """Seconds saved by drafts, per drafting model and per annotator, from one build's
    ``rows`` and their ``lead_times`` (annotation id -> seconds; absent or None: untimed).
    ``models`` and ``annotators``: acceptance figures per model / annotator
    (``drafts.figures.model_figures``), shown beside the seconds."""
    base_all: dict[int, list[float]] = defaultdict(list)
    base_own: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    by_model: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    by_person: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    untimed_model: dict[str, int] = defaultdict(int)
    untimed_person: dict[str, int] = defaultdict(int)
    untimed = {"drafted": 0, "undrafted": 0}
    drafted_times: list[float] = []
    seen: list[str] = []
    for row in rows:
        seen.append(str(row.get("updated_at") or ""))
        seconds = lead_time(lead_times.get(int(row.get("annotation_id") or 0)))
        model, who = row.get("draft_model"), str(row.get("annotator") or "")
        bucket = length_bucket(len(row.get("prompt") or ""), edges)
        if model is None:
            if seconds is None:
                untimed["undrafted"] += 1
            else:
                base_all[bucket].append(seconds)
                base_own[who][bucket].append(seconds)
            continue
        by_model[model].setdefault(bucket, [])  # a drafted group exists even with no time
        by_person[who].setdefault(bucket, [])
        if seconds is None:
            untimed["drafted"] += 1
            untimed_model[model] += 1
            untimed_person[who] += 1
            continue
        drafted_times.append(seconds)
        by_model[model][bucket].append(seconds)
        by_person[who][bucket].append(seconds)
    baseline = _medians(base_all)
    model_out = {m: _group(by_model[m], untimed_model[m], baseline, (models or {}).get(m))
                 for m in sorted(by_model)}
    person_out = {a: {**_group(by_person[a], untimed_person[a], _medians(base_own[a]),
                               (annotators or {}).get(a)),
                      "baseline_annotations": sum(map(len, base_own[a].values()))}
                  for a in sorted(by_person)}
    totals = [f["saved_total_s"] for f in model_out.values() if f["saved_total_s"] is not None]
    every_base = [x for xs in base_all.values() for x in xs]
    dates = sorted(d for d in seen if d)
    return {
        "method": METHOD,
        "bucket_edges": list(edges),
        "period": {"from": dates[0], "to": dates[-1]} if dates else None,
        "annotations": len(seen),
        "timed": len(every_base) + len(drafted_times),
        "untimed": untimed,
        "baseline": {"annotations": len(every_base),
                     "median_s": _round(statistics.median(every_base)) if every_base else None,
                     "by_bucket": {bucket_label(b, edges): {"annotations": len(base_all[b]),
                                                            "median_s": _round(baseline[b])}
                                   for b in sorted(baseline)}},
        "drafted": {"annotations": len(drafted_times),
                    "median_s": _round(statistics.median(drafted_times)) if drafted_times else None},
        "saved_total_s": _round(sum(totals)) if totals else None,
        "models": model_out,
        "annotators": person_out,
    }


TABLE_KEYS = ("annotations", "untimed", "compared", "no_baseline", "median_with_draft_s",
              "median_without_draft_s", "saved_per_task_s", "saved_total_s", "acceptance_rate",
              "mean_similarity")


def return_table(figures: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of a table artifact: one per drafting model, then one per annotator."""
    return [{"group": group, "name": name, **{k: f.get(k) for k in TABLE_KEYS}}
            for group, key in (("model", "models"), ("annotator", "annotators"))
            for name, f in (figures.get(key) or {}).items()]


def publish_draft_return(dataset: str, version: str, figures: Mapping[str, Any] | None) -> None:
    """The draft-return artifacts of a build: a table (one row per model and per annotator,
    the card's section as its description) and its picture (seconds saved per task)."""
    if not (figures or {}).get("models"):
        return  # no annotation started from a draft: nothing to show
    from prefect.artifacts import create_table_artifact

    from sftflow.tasks.build.pictures import draft_return_png, publish_pictures
    from sftflow.tasks.versions.formats import draft_return_section

    create_table_artifact(return_table(figures),
                          key=artifact_key("dataset", dataset, "draft-return"),
                          description="\n".join(draft_return_section(dict(figures))))
    publish_pictures({"draft_return": draft_return_png(figures)},
                     artifact_key("draft-return", dataset), f"{dataset} @ {version}")


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
publish_draft_return_task = io_task(name="publish-draft-return")(publish_draft_return)
