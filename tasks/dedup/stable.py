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

from sftflow.tasks.dedup.minhash import (
    DedupConfig,
    Fingerprints,
    _components,
    _timestamp,
    _truncate,
    dedup_text,
    similar_pairs,
)
from sftflow.tasks.dedup.split import SplitLeakage, leakage, split_by_cluster, split_groups

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
    n = n_r + n_f
    if n_f == 0:
        return StableResult(np.zeros(0, bool), np.zeros(0, np.int64), np.zeros(0, bool),
                            np.zeros(0, bool), [], {
                                "rows": 0, "retained": n_r, "kept": 0,
                                "dropped": {"exact_duplicate": 0, "near_duplicate": 0},
                                "dropped_against_parent": 0, "clusters_removed": 0,
                                "examples": [], "leakage_prompts": 0, "leakage_clusters": 0})
    r_sigs = np.asarray(retained_sigs, dtype=np.uint32).reshape(n_r, fresh_fps.sigs.shape[1])
    sigs = np.concatenate([r_sigs, fresh_fps.sigs])
    texts = [dedup_text(r["prompt"], r["completion"], cfg) for r in retained]
    texts += [dedup_text(r["prompt"], r["completion"], cfg) for r in fresh]

    # exact groups: one representative each, retained rows first
    if cfg.exact:
        _, first, rep_of_row = np.unique(keys, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # representatives in row order
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        reps, rep_of_row = first[order], rank[rep_of_row.ravel()]
    else:
        reps, rep_of_row = np.arange(n), np.arange(n)
    comp = np.arange(len(reps), dtype=np.int64)
    if cfg.near and len(reps) > 1:
        n_r_reps = int(np.searchsorted(reps, n_r))
        a, b, _ = similar_pairs(sigs[reps], cfg, keys[reps], [texts[i] for i in reps],
                                ignore_below=n_r_reps)
        comp = _components(len(reps), a, b)
    part = comp[rep_of_row]  # connected part per row

    # parts holding a retained row: their fresh rows go, named after that row
    twin_of_part = np.full(len(reps), _NONE, dtype=np.int64)
    if n_r:
        np.minimum.at(twin_of_part, part[:n_r], r_keys)
    f_part = part[n_r:]
    f_keys = keys[n_r:]
    r_split = {int(k): r["split"] for k, r in zip(r_keys, retained, strict=True)}
    in_r = np.isin(f_keys, r_keys) if cfg.exact else np.zeros(n_f, bool)
    twin = np.where(in_r, f_keys, twin_of_part[f_part])
    against_parent = twin != _NONE

    # parts of fresh rows only: the keep rule (ground truth, latest, longest, first)
    gt = np.fromiter((bool(r.get("ground_truth")) for r in fresh), bool, n_f)
    ts = np.fromiter((_timestamp(r.get("updated_at")) for r in fresh), float, n_f)
    ln = np.fromiter((len(r.get("completion") or "") for r in fresh), np.int64, n_f)
    order = np.lexsort((np.arange(n_f), -ln, -ts, ~gt, f_part))
    first = np.ones(n_f, dtype=bool)
    first[1:] = f_part[order][1:] != f_part[order][:-1]
    winner = np.empty(n_f, dtype=np.int64)
    winner[order] = order[first][np.cumsum(first) - 1]
    keep = ~against_parent & (winner == np.arange(n_f))
    twin = np.where(against_parent, twin, np.where(keep, _NONE, f_keys[winner]))
    exact = ~keep & (twin == f_keys)

    # splits of the kept fresh rows, then the twins' splits for the dropped ones
    kept_idx = np.flatnonzero(keep)
    split: list[str | None] = [None] * n_f
    if len(kept_idx):
        pids = [fresh[i]["prompt_id"] for i in kept_idx]
        groups = split_groups(f_keys[kept_idx], pids)
        hashed = split_by_cluster(groups, eval_fraction, seed)
        r_prompt = {r["prompt_id"]: r["split"] for r in retained}
        hard: dict[int, set[str]] = {}  # splits of retained rows sharing a prompt
        soft: dict[int, set[str]] = {}  # splits the tasks had in the parent
        for g, i, pid in zip(groups.tolist(), kept_idx.tolist(), pids, strict=True):
            if pid in r_prompt:
                hard.setdefault(g, set()).add(r_prompt[pid])
            if (had := inherited.get(int(fresh[i]["task_id"]))) is not None:
                soft.setdefault(g, set()).add(had)
        for g, i, h in zip(groups.tolist(), kept_idx.tolist(), hashed.tolist(), strict=True):
            want = hard.get(g) or soft.get(g)
            split[i] = ("train" if "train" in want else "eval") if want else (
                "eval" if h else "train")
    kept_split = {int(f_keys[i]): split[i] for i in kept_idx}
    for i in np.flatnonzero(~keep).tolist():
        split[i] = r_split.get(int(twin[i])) or kept_split.get(int(twin[i]))

    all_prompts = [r["prompt_id"] for r in retained] + [fresh[i]["prompt_id"] for i in kept_idx]
    all_eval = np.array([r["split"] == "eval" for r in retained]
                        + [split[i] == "eval" for i in kept_idx], dtype=bool)
    leak = leakage(np.asarray(all_prompts, dtype=object).astype(str), all_eval) if len(
        all_prompts) else 0
    if leak:
        raise SplitLeakage(f"split leakage: {leak} prompts in both train and eval")

    dropped = ~keep
    removed_parts = np.unique(f_part[dropped])
    examples = []
    for p in removed_parts[:max_examples].tolist():
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
            "kept": {"text": _truncate(kept_text, example_chars),
                     "retained": bool(against_parent[members[0]])},
            "dropped": [{"reason": "exact_duplicate" if exact[i] else "near_duplicate",
                         "text": _truncate(texts[n_r + int(i)], example_chars)}
                        for i in members[~keep[members]][:3]],
        })
    stats = {
        "rows": n_f,
        "retained": n_r,
        "kept": int(keep.sum()),
        "dropped": {"exact_duplicate": int(exact.sum()),
                    "near_duplicate": int((dropped & ~exact).sum())},
        "dropped_against_parent": int(against_parent.sum()),
        "clusters_removed": len(removed_parts),
        "examples": examples,
        "leakage_prompts": 0,
        "leakage_clusters": 0,
    }
    return StableResult(keep, twin, exact, against_parent, split, stats)
