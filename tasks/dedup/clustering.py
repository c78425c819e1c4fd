"""Clusters of duplicate rows and the keep rule: which row of each cluster survives.

5. *Cluster* (``cluster``): rows with the same exact key are merged; one representative per
   exact group goes through LSH and pair verification (``minhash.similar_pairs``); accepted
   pairs are merged (connected components). A cluster's id is the smallest content key (hash
   of the normalised text) among its members, so it depends on the set of rows, not their
   order.
6. *Keep rule* (``deduplicate``, ``winners``): in each cluster keep the ground-truth row, then
   the latest ``updated_at``, then the longest completion, then the lowest row index.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from sftflow.tasks.dedup.config import DedupConfig
from sftflow.tasks.dedup.minhash import (
    Fingerprints,
    connected_components,
    fingerprint,
    similar_pairs,
)
from sftflow.tasks.dedup.text import dedup_text


def _content_keys(exact_keys: Sequence[Any] | np.ndarray) -> np.ndarray:
    arr = np.asarray(exact_keys)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    out = np.empty(len(arr), dtype=np.int64)
    for i, key in enumerate(arr):
        digest = hashlib.blake2b(str(key).encode("utf-8", "surrogatepass"), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") >> 1
    return out


def cluster(
    sigs: np.ndarray,
    cfg: DedupConfig,
    exact_keys: Sequence[Any] | np.ndarray | None = None,
    texts: Sequence[str] | None = None,
) -> np.ndarray:
    """int64 cluster id per row: the smallest content key among the cluster's members.

    ``exact_keys`` (strings or ints, e.g. ``Fingerprints.keys``) merge identical texts first
    and serve as content keys; without them a row's content key is a hash of its signature.
    Ids depend on the set of rows, not their order. ``cfg.near=False`` keeps exact groups only;
    ``cfg.exact=False`` ignores ``exact_keys`` for merging (identical texts still share a
    signature and merge as near-duplicates when ``near`` is on). With ``texts`` (the compared
    texts, row-aligned), pairs near the threshold are checked by exact Jaccard (``similar_pairs``).
    """
    sigs = np.asarray(sigs)
    n = len(sigs)
    if exact_keys is None:
        ckey = _content_keys(
            [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in sigs]
        )
    else:
        if len(exact_keys) != n:
            raise ValueError(f"exact_keys has {len(exact_keys)} entries for {n} signatures")
        ckey = _content_keys(exact_keys)
    if cfg.exact and exact_keys is not None:
        _, rep_of_row = np.unique(ckey, return_inverse=True)
        rep_of_row = rep_of_row.ravel()
        first = np.full(rep_of_row.max(initial=-1) + 1, n, dtype=np.int64)
        np.minimum.at(first, rep_of_row, np.arange(n))
        reps = first
    else:
        rep_of_row = np.arange(n)
        reps = np.arange(n)
    comp = np.arange(len(reps), dtype=np.int64)
    if cfg.near and len(reps) > 1:
        rep_texts = None if texts is None else [texts[i] for i in reps]
        a, b, _ = similar_pairs(sigs[reps], cfg, ckey[reps], rep_texts)
        comp = connected_components(len(reps), a, b)
    comp_of_row = comp[rep_of_row]
    cid = np.full(len(reps), np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(cid, comp_of_row, ckey)
    return cid[comp_of_row]


@dataclass
class DedupResult:
    """Which rows survive, their clusters, and what was dropped and why."""

    keep: np.ndarray  # bool per row
    cluster_id: np.ndarray  # int64 per row
    dropped: dict[str, int] = field(default_factory=dict)  # exact_duplicate, near_duplicate
    clusters_removed: int = 0  # clusters that lost at least one row
    examples: list[dict] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return int(self.keep.sum())

    def summary(self) -> dict:
        """JSON-ready counts (no row text)."""
        return {
            "rows": len(self.keep),
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "clusters_removed": self.clusters_removed,
        }


def _timestamp(value: Any) -> float:
    if value is None or value == "":
        return float("-inf")
    if isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = datetime.fromisoformat(str(value))
        except ValueError:
            return float("-inf")
    if dt.tzinfo is None:  # naive times are taken as UTC
        return (dt - datetime(1970, 1, 1)).total_seconds()
    return dt.timestamp()


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"



def winners(rows: Sequence[Mapping[str, Any]], groups: np.ndarray) -> np.ndarray:
    """Per row, the row its group keeps: ground truth first, then the latest ``updated_at``
    (ISO 8601; missing sorts oldest), then the longest completion, then the lowest index."""
    n = len(rows)
    gt = np.fromiter((bool(r.get("ground_truth")) for r in rows), dtype=bool, count=n)
    ts = np.fromiter((_timestamp(r.get("updated_at")) for r in rows), dtype=float, count=n)
    ln = np.fromiter((len(r.get("completion") or "") for r in rows), dtype=np.int64, count=n)
    # Sort by group, then best first; the first row of each group is kept.
    order = np.lexsort((np.arange(n), -ln, -ts, ~gt, groups))
    first = np.ones(n, dtype=bool)
    first[1:] = groups[order][1:] != groups[order][:-1]
    winner = np.empty(n, dtype=np.int64)
    winner[order] = order[first][np.cumsum(first) - 1]
    return winner


def deduplicate(
    rows: Sequence[Mapping[str, Any]],
    cfg: DedupConfig,
    *,
    fingerprints: Fingerprints | None = None,
    executor: Executor | None = None,
    shard_rows: int = 20_000,
    max_examples: int = 5,
    example_chars: int = 200,
) -> DedupResult:
    """Exact + near dedup of ``rows`` ("prompt", "completion", "ground_truth", "updated_at").

    Keep rule per cluster (``winners``): ground truth first, then the latest ``updated_at``
    (ISO 8601; missing sorts oldest), then the longest completion, then the lowest row index.
    ``fingerprints`` (e.g. computed per shard by mapped tasks and concatenated) skip the
    hashing; otherwise ``executor`` (a process pool) fingerprints shards of ``shard_rows``.
    """
    n = len(rows)
    texts = [dedup_text(r.get("prompt") or "", r.get("completion") or "", cfg) for r in rows]
    if fingerprints is None:
        fingerprints = _fingerprint_texts(texts, cfg, executor, shard_rows)
    if len(fingerprints) != n:
        raise ValueError(f"fingerprints cover {len(fingerprints)} rows, not {n}")
    if not cfg.exact and not cfg.near:  # nothing dropped; identical texts still share a cluster
        return DedupResult(
            np.ones(n, dtype=bool),
            fingerprints.keys.copy(),
            {"exact_duplicate": 0, "near_duplicate": 0},
        )
    cid = cluster(fingerprints.sigs, cfg, fingerprints.keys, texts)
    winner = winners(rows, cid)  # the kept row of each row's cluster
    keep = winner == np.arange(n)
    exact_dup = ~keep & (fingerprints.keys == fingerprints.keys[winner])
    near_dup = ~keep & ~exact_dup
    removed_clusters = np.unique(cid[~keep])
    return DedupResult(
        keep=keep,
        cluster_id=cid,
        dropped={"exact_duplicate": int(exact_dup.sum()), "near_duplicate": int(near_dup.sum())},
        clusters_removed=len(removed_clusters),
        examples=_examples(texts, cid, keep, exact_dup, removed_clusters, max_examples,
                           example_chars),
    )


def _fingerprint_texts(
    texts: list[str], cfg: DedupConfig, executor: Executor | None, shard_rows: int
) -> Fingerprints:
    """``fingerprint`` of ``texts``, by shards of ``shard_rows`` in ``executor`` when given."""
    n = len(texts)
    if executor is not None and n > shard_rows:
        shards = [texts[i : i + shard_rows] for i in range(0, n, shard_rows)]
        parts = list(executor.map(fingerprint, shards, [cfg] * len(shards)))
        return Fingerprints.concat(parts)
    return fingerprint(texts, cfg)


def _examples(
    texts: list[str], cid: np.ndarray, keep: np.ndarray, exact_dup: np.ndarray,
    removed_clusters: np.ndarray, max_examples: int, example_chars: int,
) -> list[dict]:
    """The largest clusters that lost rows (ties by id: deterministic): the kept row's text and
    up to three dropped ones, truncated to ``example_chars``."""
    examples: list[dict] = []
    if not len(removed_clusters):
        return examples
    sizes = np.bincount(np.searchsorted(removed_clusters, cid[np.isin(cid, removed_clusters)]))
    for j in np.lexsort((removed_clusters, -sizes))[:max_examples]:
        members = np.flatnonzero(cid == removed_clusters[j])
        kept_row = int(members[keep[members]][0])
        examples.append(
            {
                "cluster_id": int(removed_clusters[j]),
                "size": len(members),
                "kept": {"row": kept_row, "text": truncate(texts[kept_row], example_chars)},
                "dropped": [
                    {
                        "row": int(i),
                        "reason": "exact_duplicate" if exact_dup[i] else "near_duplicate",
                        "text": truncate(texts[i], example_chars),
                    }
                    for i in members[~keep[members]][:3]
                ],
            }
        )
    return examples
