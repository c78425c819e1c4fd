"""The stable keep rule: a version keeps its parent's rows, and new rows are deduplicated
against them and against each other.

Rows come in two kinds. *Retained* rows are the parent version's rows whose task did not
change: they stay, with their split and cluster id, and are never compared with each other
(they were deduplicated when they arrived). *Fresh* rows come from tasks that are new or whose
annotations changed (a correction follows the annotation policy as usual), or from tasks whose
row was dropped as the duplicate of a row that has since left.

The graph: exact-key and near-duplicate edges (MinHash + LSH, verified as in ``cluster``)
between a fresh row and any row, never between two retained rows. In a connected part holding
a retained row, every fresh row is dropped as that row's duplicate (the exclusion names it);
in a part of fresh rows only, the usual keep rule picks one (ground truth, latest, longest,
first). A full build and an incremental build hand this function the same retained and fresh
rows, so they make the same version.

Splits: a retained row keeps its split. A kept fresh row sharing a prompt with a retained row
takes that row's split; one whose task had a row in the parent, or was a duplicate of one,
takes that split (train first, so a row a model trained on never reaches eval); the rest are
split by group as in ``split.assign_splits``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sftflow.tasks.dedup.clustering import truncate, winners
from sftflow.tasks.dedup.config import DedupConfig
from sftflow.tasks.dedup.minhash import Fingerprints, connected_components, similar_pairs
from sftflow.tasks.dedup.split import SplitLeakage, leakage, split_by_cluster, split_groups
from sftflow.tasks.dedup.text import dedup_text

_NONE = np.iinfo(np.int64).max


def hex_key(key: int) -> str:
    """A content key as a row's ``cluster_id`` (16 hex digits)."""
    return f"{int(key) & 0xFFFFFFFFFFFFFFFF:016x}"


@dataclass
class StableResult:
    keep: np.ndarray  # bool per fresh row
    twin: np.ndarray  # int64 per fresh row: the key of the row it duplicates (_NONE if kept)
    exact: np.ndarray  # bool per fresh row: dropped as an exact duplicate
    against_parent: np.ndarray  # bool per fresh row: dropped as a duplicate of a retained row
    split: list[str | None]  # per fresh row: its split if kept, its twin's split if dropped
    stats: dict[str, Any] = field(default_factory=dict)


class DedupTexts(Sequence[str]):
    """Row ``i``'s dedup text (retained rows first, then fresh ones), made the first time it is
    asked for and kept. Only the rows of pairs verified by exact Jaccard (estimates near the
    threshold) and of the examples need theirs: making every row's, retained ones included,
    cost an incremental build time and memory sized by the project, not by its change.
    Indexed by integers only; ``subset`` gives a view of some rows, sharing what was made."""

    def __init__(self, retained: Sequence[Mapping[str, Any]], fresh: Sequence[Mapping[str, Any]],
                 cfg: DedupConfig, index: np.ndarray | None = None,
                 made: dict[int, str] | None = None):
        self._retained, self._fresh, self._cfg, self._index = retained, fresh, cfg, index
        self._made: dict[int, str] = {} if made is None else made

    def __len__(self) -> int:
        return len(self._retained) + len(self._fresh) if self._index is None else len(self._index)

    def __getitem__(self, i: Any) -> Any:
        if not isinstance(i, int | np.integer):
            raise TypeError("DedupTexts are indexed by integers only")
        j = int(i) if self._index is None else int(self._index[i])
        text = self._made.get(j)
        if text is None:
            n_r = len(self._retained)
            row = self._retained[j] if j < n_r else self._fresh[j - n_r]
            text = self._made[j] = dedup_text(row["prompt"], row["completion"], self._cfg)
        return text

    def subset(self, index: np.ndarray) -> DedupTexts:
        index = np.asarray(index) if self._index is None else self._index[np.asarray(index)]
        return DedupTexts(self._retained, self._fresh, self._cfg, index, self._made)


def stable_dedup(
    retained: Sequence[Mapping[str, Any]], retained_sigs: np.ndarray,
    fresh: Sequence[Mapping[str, Any]], fresh_fps: Fingerprints, cfg: DedupConfig, *,
    eval_fraction: float, seed: int | str = 0, inherited: Mapping[int, str] | None = None,
    max_examples: int = 5, example_chars: int = 200,
) -> StableResult:
    """Fresh rows against retained rows and each other; see the module docstring.
    ``retained`` rows carry ``cluster_id`` (their own content key) and ``split``;
    ``inherited`` maps a task id to the split its parent row (or its twin) had."""
    inherited = inherited or {}
    n_r, n_f = len(retained), len(fresh)
    r_keys = np.fromiter((int(r["cluster_id"], 16) for r in retained), np.int64, n_r)
    keys = np.concatenate([r_keys, fresh_fps.keys.astype(np.int64)])
    if n_f == 0:
        return StableResult(np.zeros(0, bool), np.zeros(0, np.int64), np.zeros(0, bool),
                            np.zeros(0, bool), [], {
                                "rows": 0, "retained": n_r, "kept": 0,
                                "dropped": {"exact_duplicate": 0, "near_duplicate": 0},
                                "dropped_against_parent": 0, "clusters_removed": 0,
                                "examples": [], "leakage_prompts": 0, "leakage_clusters": 0})
    r_sigs = np.asarray(retained_sigs, dtype=np.uint32).reshape(n_r, fresh_fps.sigs.shape[1])
    sigs = np.concatenate([r_sigs, fresh_fps.sigs])
    texts = DedupTexts(retained, fresh, cfg)
    part = _connected_parts(keys, sigs, texts, n_r, cfg)  # connected part per row
    f_part, f_keys = part[n_r:], keys[n_r:]

    # parts holding a retained row: their fresh rows go, named after that row
    twin = _retained_twins(part, r_keys, f_keys, cfg)
    against_parent = twin != _NONE
    # parts of fresh rows only: the keep rule (ground truth, latest, longest, first)
    winner = winners(fresh, f_part)
    keep = ~against_parent & (winner == np.arange(n_f))
    twin = np.where(against_parent, twin, np.where(keep, _NONE, f_keys[winner]))
    exact = ~keep & (twin == f_keys)

    split = _splits(retained, fresh, r_keys, f_keys, keep, twin, eval_fraction=eval_fraction,
                    seed=seed, inherited=inherited)
    _check_leakage(retained, fresh, keep, split)
    res = StableResult(keep, twin, exact, against_parent, split)
    removed_parts = np.unique(f_part[~keep])
    res.stats = {
        "rows": n_f,
        "retained": n_r,
        "kept": int(keep.sum()),
        "dropped": {"exact_duplicate": int(exact.sum()),
                    "near_duplicate": int((~keep & ~exact).sum())},
        "dropped_against_parent": int(against_parent.sum()),
        "clusters_removed": len(removed_parts),
        "examples": _examples(res, f_part, removed_parts[:max_examples], r_keys, texts,
                              example_chars),
        "leakage_prompts": 0,
        "leakage_clusters": 0,
    }
    return res


def _connected_parts(
    keys: np.ndarray, sigs: np.ndarray, texts: DedupTexts, n_r: int, cfg: DedupConfig
) -> np.ndarray:
    """Connected part per row (retained rows first): exact groups, one representative each,
    joined by near-duplicate pairs that hold a fresh row (verified as in ``cluster``)."""
    if cfg.exact:
        _, first, rep_of_row = np.unique(keys, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # representatives in row order
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        reps, rep_of_row = first[order], rank[rep_of_row.ravel()]
    else:
        reps, rep_of_row = np.arange(len(keys)), np.arange(len(keys))
    comp = np.arange(len(reps), dtype=np.int64)
    if cfg.near and len(reps) > 1:
        n_r_reps = int(np.searchsorted(reps, n_r))
        a, b, _ = similar_pairs(sigs[reps], cfg, keys[reps], texts.subset(reps),
                                ignore_below=n_r_reps)
        comp = connected_components(len(reps), a, b)
    return comp[rep_of_row]


def _retained_twins(
    part: np.ndarray, r_keys: np.ndarray, f_keys: np.ndarray, cfg: DedupConfig
) -> np.ndarray:
    """Per fresh row, the key of the retained row it duplicates (``_NONE``: none): its own key
    when a retained row has it, else the smallest retained key in its part."""
    n_r = len(r_keys)
    twin_of_part = np.full(len(part), _NONE, dtype=np.int64)
    if n_r:
        np.minimum.at(twin_of_part, part[:n_r], r_keys)
    in_r = np.isin(f_keys, r_keys) if cfg.exact else np.zeros(len(f_keys), bool)
    return np.where(in_r, f_keys, twin_of_part[part[n_r:]])


def _splits(
    retained: Sequence[Mapping[str, Any]], fresh: Sequence[Mapping[str, Any]],
    r_keys: np.ndarray, f_keys: np.ndarray, keep: np.ndarray, twin: np.ndarray, *,
    eval_fraction: float, seed: int | str, inherited: Mapping[int, str],
) -> list[str | None]:
    """Per fresh row: its split if kept (``_kept_splits``), its twin's split if dropped."""
    kept_idx = np.flatnonzero(keep)
    split: list[str | None] = [None] * len(fresh)
    if len(kept_idx):
        kept_splits = _kept_splits(retained, [fresh[i] for i in kept_idx], f_keys[kept_idx],
                                   eval_fraction, seed, inherited)
        for i, s in zip(kept_idx.tolist(), kept_splits, strict=True):
            split[i] = s
    r_split = {int(k): r["split"] for k, r in zip(r_keys, retained, strict=True)}
    kept_split = {int(f_keys[i]): split[i] for i in kept_idx}
    for i in np.flatnonzero(~keep).tolist():
        split[i] = r_split.get(int(twin[i])) or kept_split.get(int(twin[i]))
    return split


def _kept_splits(
    retained: Sequence[Mapping[str, Any]], kept: list[Mapping[str, Any]], kept_keys: np.ndarray,
    eval_fraction: float, seed: int | str, inherited: Mapping[int, str],
) -> list[str]:
    """Splits of the kept fresh rows, by group (``split.split_groups``): a retained row's split
    when one shares a prompt with the group, else the split its tasks had in the parent (train
    first in both), else by hash (``split.split_by_cluster``)."""
    pids = [r["prompt_id"] for r in kept]
    groups = split_groups(kept_keys, pids)
    hashed = split_by_cluster(groups, eval_fraction, seed)
    r_prompt = {r["prompt_id"]: r["split"] for r in retained}
    hard: dict[int, set[str]] = {}  # splits of retained rows sharing a prompt
    soft: dict[int, set[str]] = {}  # splits the tasks had in the parent
    for g, row, pid in zip(groups.tolist(), kept, pids, strict=True):
        if pid in r_prompt:
            hard.setdefault(g, set()).add(r_prompt[pid])
        if (had := inherited.get(int(row["task_id"]))) is not None:
            soft.setdefault(g, set()).add(had)
    out = []
    for g, h in zip(groups.tolist(), hashed.tolist(), strict=True):
        want = hard.get(g) or soft.get(g)
        out.append(("train" if "train" in want else "eval") if want else ("eval" if h else "train"))
    return out


def _check_leakage(
    retained: Sequence[Mapping[str, Any]], fresh: Sequence[Mapping[str, Any]],
    keep: np.ndarray, split: list[str | None],
) -> None:
    """Raise SplitLeakage when a prompt is in both train and eval among the version's rows."""
    kept_idx = np.flatnonzero(keep)
    all_prompts = [r["prompt_id"] for r in retained] + [fresh[i]["prompt_id"] for i in kept_idx]
    all_eval = np.array([r["split"] == "eval" for r in retained]
                        + [split[i] == "eval" for i in kept_idx], dtype=bool)
    leak = leakage(np.asarray(all_prompts, dtype=object).astype(str), all_eval) if len(
        all_prompts) else 0
    if leak:
        raise SplitLeakage(f"split leakage: {leak} prompts in both train and eval")


def _examples(
    res: StableResult, f_part: np.ndarray, parts: np.ndarray, r_keys: np.ndarray,
    texts: Sequence[str], example_chars: int,
) -> list[dict]:
    """One example per part in ``parts`` (that lost fresh rows): the kept (or retained) row's
    text and up to three dropped ones, truncated to ``example_chars``."""
    n_r = len(r_keys)
    keep, against_parent, twin = res.keep, res.against_parent, res.twin
    examples = []
    for p in parts.tolist():
        members = np.flatnonzero(f_part == p)
        kept_here = members[keep[members]]
        if against_parent[members[0]]:
            r_idx = int(np.flatnonzero(r_keys == twin[members[0]])[0])
            kept_text = texts[r_idx]
        else:
            kept_text = texts[n_r + int(kept_here[0])]
        examples.append({
            "cluster_id": hex_key(twin[members[~keep[members]][0]]),
            "size": len(members) + (1 if against_parent[members[0]] else 0),
            "kept": {"text": truncate(kept_text, example_chars),
                     "retained": bool(against_parent[members[0]])},
            "dropped": [{"reason": "exact_duplicate" if res.exact[i] else "near_duplicate",
                         "text": truncate(texts[n_r + int(i)], example_chars)}
                        for i in members[~keep[members]][:3]],
        })
    return examples
