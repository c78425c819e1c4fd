"""The build's per-shard work: rows cut into shards, the filtered shards merged back with
their counts, and the dedup texts fingerprinted shard by shard (the flow maps the filter and
the fingerprint over shards, on threads or a Dask cluster). Pure: no services.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TypeVar

from sftflow.tasks.build.filters import FilterResult
from sftflow.tasks.dedup import DedupConfig, dedup_text, fingerprint
from sftflow.tasks.runtime.declare import compute_task
from sftflow.tasks.versions.rows import Exclusion, SftRow

T = TypeVar("T")


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """``items`` cut into shards of ``size`` (one empty shard for no items)."""
    return [items[i:i + size] for i in range(0, len(items), size)] or [items[:0]]


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


# -- Prefect tasks: the functions above, as the flows run them ------------------------------
#: ``dedup.fingerprint``, mapped over shards of dedup texts.
fingerprint_task = compute_task(name="fingerprint-shard")(fingerprint)
