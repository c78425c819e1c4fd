"""The train/eval split by dedup cluster, and the leakage check that guards it.

A row's split is decided by its *group*: its content key joined with every other row that
shares its prompt (several annotations of one prompt, or equal prompts with different
answers), so that neither a near-duplicate nor a prompt straddles train and eval. A group
goes to eval when a hash of (seed, group id) falls under ``eval_fraction``. Pure numpy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sftflow.tasks.dedup.hashing import U64, mix64


def split_by_cluster(
    cluster_ids: np.ndarray, eval_fraction: float, seed: int | str = 0
) -> np.ndarray:
    """True = eval. A cluster goes to eval when hash(seed, cluster id) < eval_fraction.

    Whole clusters only, and independent of row order. The eval share of rows is
    ``eval_fraction`` in expectation, not exactly.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be within [0, 1], got {eval_fraction}")
    ids = np.asarray(cluster_ids, dtype=np.int64)
    salt = int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=8).digest(), "little")
    with np.errstate(over="ignore"):
        h = mix64(ids.astype(U64) ^ U64(salt))
    u = (h >> U64(11)).astype(np.float64) / float(1 << 53)
    return u < eval_fraction


def leakage(cluster_ids: np.ndarray | Sequence[Any], is_eval: np.ndarray) -> int:
    """Number of clusters with rows in both train and eval (0 for ``split_by_cluster``)."""
    ids = np.asarray(cluster_ids)
    ev = np.asarray(is_eval, dtype=bool)
    return len(np.intersect1d(np.unique(ids[ev]), np.unique(ids[~ev])))


def split_groups(cluster_ids: np.ndarray, prompt_ids: Sequence[str]) -> np.ndarray:
    """Clusters joined with the rows sharing a prompt (union-find). Each group takes the
    smallest cluster id of its members; returns the group id per row."""
    parent: dict[Any, Any] = {}

    def find(x: Any) -> Any:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for cid, pid in zip(np.asarray(cluster_ids).tolist(), prompt_ids, strict=True):
        a, b = find(("c", cid)), find(("p", pid))
        if a != b:
            parent[max(a, b)] = min(a, b)  # ("c", ...) < ("p", ...): a cluster stays root
    best: dict[Any, int] = {}
    for cid in np.asarray(cluster_ids).tolist():
        root = find(("c", cid))
        best[root] = min(best.get(root, cid), cid)
    return np.array([best[find(("c", c))] for c in np.asarray(cluster_ids).tolist()],
                    dtype=np.int64)


class SplitLeakage(RuntimeError):
    """A cluster or a prompt ended up in both splits: a bug, never published."""


@dataclass(frozen=True)
class Split:
    is_eval: np.ndarray  # bool per row
    groups: int  # number of split groups
    leakage_clusters: int
    leakage_prompts: int


def assign_splits(
    content_keys: np.ndarray, cluster_ids: np.ndarray, prompt_ids: Sequence[str],
    eval_fraction: float, seed: int | str = 0,
) -> Split:
    """Train/eval per row of deduplicated rows: grouped by ``content_keys`` joined through
    ``prompt_ids``, then checked to leak neither a dedup cluster (``cluster_ids``) nor a
    prompt across the splits. Raises ``SplitLeakage`` if one does."""
    groups = split_groups(content_keys, prompt_ids)
    is_eval = split_by_cluster(groups, eval_fraction, seed)
    leak_clusters = leakage(cluster_ids, is_eval) if len(groups) else 0
    leak_prompts = leakage(np.asarray(list(prompt_ids)), is_eval) if len(groups) else 0
    if leak_clusters or leak_prompts:
        raise SplitLeakage(f"split leakage: {leak_clusters} clusters, {leak_prompts} prompts")
    return Split(is_eval=is_eval, groups=len(np.unique(groups)) if len(groups) else 0,
                 leakage_clusters=leak_clusters, leakage_prompts=leak_prompts)
