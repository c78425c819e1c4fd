"""The flywheel's own figures, from a build's exported rows: how often annotators accept each
drafting model's draft unchanged and how far they edit it; how far annotators of the same task
agree, and who disagrees far from the rest; and the training policy for unedited drafts.

Pure functions over what the export parse leaves (``ParsedExport.rows`` with their ``draft_*``
fields, ``ParsedExport.agreement``); ``sftflow.tasks.build.edits`` says where those come
from and which similarity they use. The figures are JSON-ready, for ``manifest.stats["drafts"]``
(the version card renders them: ``formats.drafts_section``).

Acceptance is measured on the rows the export picked (all annotations under the ``all``
policy), before the filters and dedup: it describes what annotators did with each model's
drafts, whatever later stages keep.

Outlying annotators. An annotator's agreement is the mean similarity of the pairs they are in.
Each annotator with at least ``min_pairs`` pairs is compared with the others (at least two
others with ``min_pairs`` each): robust z = (mean - median of the others' means) / scale,
where scale = max(1.4826 x MAD of the others' means, ``scale_floor``). Leaving the annotator
out keeps an outlier from pulling the median and MAD of the group it is compared with; the
floor keeps a tight group (MAD near 0) from flagging a dip of a few points. Flagged: robust z
at or below ``-z_threshold`` (3 by default: 0.15 below the others' median when they agree
closely). Only low agreement is flagged, and only for review, never dropped.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sftflow.tasks.build.draft_return import draft_return
from sftflow.tasks.build.edits import Pair
from sftflow.tasks.build.filters import (
    DEFAULT_DRAFT_POLICY,
    POLICY_REASON,
    DraftPolicy,
    is_accepted_unchanged,
)
from sftflow.tasks.runtime.declare import artifact_key, io_task
from sftflow.tasks.versions import formats
from sftflow.tasks.versions.rows import SftRow

SIMILARITY = "rapidfuzz.distance.Levenshtein.normalized_similarity (1 = unchanged)"


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _mean(xs: Sequence[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def model_figures(rows: Iterable[SftRow], key: str = "draft_model") -> dict[str, dict[str, Any]]:
    """Per drafting model (sorted): rows that started from its draft, how many were accepted
    unchanged, the acceptance rate, and the mean and median edit similarity (of all its rows,
    and of the edited ones). Rows whose draft had no response text count in ``rows`` only.
    ``key``: the row field that groups the drafted rows (``"annotator"``: per annotator)."""
    sims: dict[str, list[float]] = defaultdict(list)
    edits: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for row in rows:
        if row.get("draft_model") is None:
            continue
        model = str(row.get(key))
        counts[model] += 1
        if (sim := row.get("draft_similarity")) is not None:
            sims[model].append(float(sim))
            if not is_accepted_unchanged(row):
                edits[model].append(float(sim))
    out: dict[str, dict[str, Any]] = {}
    for model in sorted(counts):
        s, edited = sims[model], edits[model]
        unchanged = len(s) - len(edited)
        out[model] = {
            "rows": counts[model],
            "compared": len(s),
            "accepted_unchanged": unchanged,
            "acceptance_rate": _round(unchanged / len(s)) if s else None,
            "mean_similarity": _round(_mean(s)),
            "median_similarity": _round(statistics.median(s)) if s else None,
            "mean_similarity_edited": _round(_mean(edited)),
        }
    return out


def annotator_agreement(
    agreement: Mapping[int, Sequence[Pair]], *, min_pairs: int = 3, z_threshold: float = 3.0,
    scale_floor: float = 0.05, lowest: int = 5,
) -> dict[str, Any]:
    """Agreement between annotators of the same tasks (``ParsedExport.agreement``): the mean
    pairwise edit similarity overall and per annotator, each annotator's robust z against
    the others, who is flagged (see the module docstring), and the ``lowest`` least similar
    pairs (task ids a reviewer can open)."""
    per: dict[str, list[float]] = defaultdict(list)
    tasks_of: dict[str, set[int]] = defaultdict(set)
    every: list[tuple[float, int, str, str]] = []
    for task_id, pairs in agreement.items():
        for a, b, sim in pairs:
            every.append((sim, task_id, a, b))
            for who in (a, b):
                per[who].append(sim)
                tasks_of[who].add(task_id)
    means = {a: statistics.fmean(s) for a, s in per.items()}
    eligible = {a: m for a, m in means.items() if len(per[a]) >= min_pairs}
    annotators: dict[str, dict[str, Any]] = {}
    for a in sorted(per):
        z = None
        others = [m for b, m in eligible.items() if b != a]
        if a in eligible and len(others) >= 2:
            centre = statistics.median(others)
            mad = statistics.median(abs(m - centre) for m in others)
            z = (means[a] - centre) / max(1.4826 * mad, scale_floor)
        annotators[a] = {"pairs": len(per[a]), "tasks": len(tasks_of[a]),
                         "mean_similarity": _round(means[a]), "robust_z": _round(z),
                         "flagged": z is not None and z <= -z_threshold}
    every.sort()
    return {
        "tasks": sum(1 for pairs in agreement.values() if pairs),
        "pairs": len(every),
        "mean_similarity": _round(_mean([p[0] for p in every])),
        "annotators": annotators,
        "flagged": [a for a, f in annotators.items() if f["flagged"]],
        "lowest_pairs": [{"task_id": t, "annotators": [a, b], "similarity": _round(s)}
                         for s, t, a, b in every[:lowest]],
        "method": (f"robust z of an annotator's mean pairwise similarity against the other "
                   f"annotators' means (median, 1.4826 MAD, scale floor {scale_floor}); flagged "
                   f"at z <= -{z_threshold} with {min_pairs}+ pairs"),
    }


def draft_figures(
    rows: Sequence[SftRow], agreement: Mapping[int, Sequence[Pair]],
    policy: DraftPolicy = DEFAULT_DRAFT_POLICY,
    lead_times: Mapping[int, float | None] | None = None, **agreement_options: Any,
) -> dict[str, Any]:
    """``manifest.stats["drafts"]``: per-model acceptance, annotator agreement and the
    training policy, from the export's rows (before the policy and the filters) and its
    ``agreement``; with the export's ``lead_times``, the seconds drafts saved (``return``,
    ``build.draft_return``, acceptance beside). ``agreement_options`` go to
    :func:`annotator_agreement`."""
    models = model_figures(rows)
    timed = {} if lead_times is None else {"return": draft_return(
        rows, lead_times, models=models, annotators=model_figures(rows, key="annotator"))}
    return {
        "rows": len(rows),
        "drafted_rows": sum(m["rows"] for m in models.values()),
        "policy": policy,
        "policy_reason": POLICY_REASON,
        "excluded": sum(map(is_accepted_unchanged, rows)) if policy == "exclude" else 0,
        "similarity": SIMILARITY,
        "models": models,
        "agreement": annotator_agreement(agreement, **agreement_options),
        **timed,
    }


def figures_table(figures: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of a table artifact: one per drafting model."""
    return [{"model": m, **{k: f[k] for k in ("rows", "accepted_unchanged", "acceptance_rate",
                                              "mean_similarity", "mean_similarity_edited")}}
            for m, f in (figures.get("models") or {}).items()]


def figures_markdown(figures: Mapping[str, Any], title: str = "Model drafts") -> str:
    """A markdown artifact of the figures: the version card's section, plus the least similar
    annotator pairs."""
    lines = [f"# {title}", "", *formats.drafts_section(dict(figures))]
    low = (figures.get("agreement") or {}).get("lowest_pairs") or []
    if low:
        lines += ["Least similar annotator pairs:", ""]
        lines += [f"- task {p['task_id']}: {' / '.join(p['annotators'])}, similarity "
                  f"{p['similarity']:.3f}" for p in low]
    return "\n".join(lines)


def publish_figures(dataset: str, figures: Mapping[str, Any]) -> None:
    """The drafts artifact of a build: one row per drafting model, the card's section."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(figures_table(figures), key=artifact_key("dataset", dataset, "drafts"),
                          description=figures_markdown(figures))


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
publish_figures_task = io_task(name="publish-draft-figures")(publish_figures)
