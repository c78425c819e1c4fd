"""tasks.dedup.split: groups joined through shared prompts, split assignment, leakage check."""

from __future__ import annotations

import numpy as np
import pytest

from sftflow.tasks.dedup import SplitLeakage, assign_splits, split_by_cluster, split_groups


def test_split_groups_join_clusters_sharing_a_prompt():
    groups = split_groups(np.array([5, 3, 9, 7]), ["a", "b", "a", "c"])
    assert groups.tolist() == [5, 3, 5, 7]


def test_split_groups_join_transitively_and_take_the_smallest_id():
    # 9 and 4 share prompt "x"; 4 and 2 share prompt "y": one group, id 2.
    groups = split_groups(np.array([9, 4, 4, 2, 8]), ["x", "x", "y", "y", "z"])
    assert groups.tolist() == [2, 2, 2, 2, 8]


def test_assign_splits_keeps_every_prompt_on_one_side():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**62, size=400)
    prompts = [f"p{i % 90}" for i in range(400)]  # about 4 answers per prompt
    split = assign_splits(keys, keys, prompts, eval_fraction=0.3, seed=1)
    side: dict[str, set] = {}
    for p, ev in zip(prompts, split.is_eval.tolist(), strict=True):
        side.setdefault(p, set()).add(ev)
    assert all(len(s) == 1 for s in side.values())
    assert split.groups == 90 and split.leakage_clusters == split.leakage_prompts == 0
    assert 0 < split.is_eval.sum() < 400


def test_assign_splits_of_nothing():
    split = assign_splits(np.zeros(0, np.int64), np.zeros(0, np.int64), [], 0.1)
    assert split.groups == 0 and split.is_eval.tolist() == []


def test_a_leak_is_refused(monkeypatch):
    from sftflow.tasks.dedup import split as split_mod

    # A broken split function that alternates rows: the check must catch it.
    monkeypatch.setattr(split_mod, "split_by_cluster",
                        lambda ids, *_: np.arange(len(ids)) % 2 == 0)
    with pytest.raises(SplitLeakage, match="split leakage"):
        assign_splits(np.array([1, 2]), np.array([7, 7]), ["a", "b"], 0.5)


def test_split_by_cluster_is_order_free():
    ids = np.arange(1000, dtype=np.int64) * 7919
    ev = split_by_cluster(ids, 0.2, 3)
    perm = np.random.default_rng(1).permutation(1000)
    assert (split_by_cluster(ids[perm], 0.2, 3) == ev[perm]).all()
