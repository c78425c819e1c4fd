"""The stable keep rule without services: fresh rows against retained ones."""

from __future__ import annotations

import numpy as np

from sftflow.tasks.dedup import DedupConfig, fingerprint
from sftflow.tasks.dedup.stable import hex_key, stable_dedup

CFG = DedupConfig()


def _row(i: int, prompt: str, completion: str, **kw) -> dict:
    return {"prompt": prompt, "completion": completion, "prompt_id": kw.pop("pid", f"p{i}"),
            "task_id": i, "annotation_id": 100 + i, "updated_at": kw.pop("at", ""),
            "ground_truth": kw.pop("gt", False), **kw}


def _texts(rows):
    return [f"{r['prompt']}\n{r['completion']}" for r in rows]


def _retained(rows, splits):
    fp = fingerprint(_texts(rows), CFG)
    out = [dict(r, cluster_id=hex_key(k), split=s) for r, k, s in zip(rows, fp.keys, splits,
                                                                       strict=True)]
    return out, fp.sigs


LONG = ("explain how a suspension bridge carries its load from the deck through the hangers "
        "to the main cables and down into the anchorages on each bank of the river")


def test_a_fresh_near_duplicate_of_a_retained_row_is_dropped_and_names_it():
    kept, sigs = _retained([_row(1, "Q one", LONG + "."), _row(2, "Q two", "something else")],
                           ["eval", "train"])
    fresh = [_row(3, "Q one", LONG + "!", at="2030-01-01"), _row(4, "Q four", "new text")]
    res = stable_dedup(kept, sigs, fresh, fingerprint(_texts(fresh), CFG), CFG,
                       eval_fraction=0.5)
    assert res.keep.tolist() == [False, True]
    assert res.against_parent.tolist() == [True, False]
    assert hex_key(res.twin[0]) == kept[0]["cluster_id"]
    assert res.split[0] == "eval"  # the twin's split, for the task index
    assert res.stats["dropped_against_parent"] == 1


def test_retained_rows_never_drop_each_other_and_a_newer_fresh_row_never_displaces_them():
    kept, sigs = _retained([_row(1, "Q", LONG), _row(2, "Q", LONG + " too")], ["train", "train"])
    fresh = [_row(3, "Q", LONG, at="2099-01-01", gt=True)]  # exact copy, newer, ground truth
    res = stable_dedup(kept, sigs, fresh, fingerprint(_texts(fresh), CFG), CFG,
                       eval_fraction=0.5)
    assert not res.keep[0] and res.exact[0]


def test_fresh_rows_among_themselves_follow_the_keep_rule():
    fresh = [_row(1, "Q", LONG, at="2020-01-01"), _row(2, "Q", LONG + ".", at="2021-01-01")]
    res = stable_dedup([], np.zeros((0, CFG.num_perm), np.uint32), fresh,
                       fingerprint(_texts(fresh), CFG), CFG, eval_fraction=0.5)
    assert res.keep.tolist() == [False, True]  # the latest wins
    assert not res.against_parent.any()


def test_splits_follow_shared_prompts_then_the_tasks_parent_split():
    kept, sigs = _retained([_row(1, "Shared prompt", "answer A", pid="px")], ["eval"])
    fresh = [_row(2, "Shared prompt", "a different answer B", pid="px"),
             _row(3, "Corrected", "the corrected answer"),
             _row(4, "Brand new", "a brand new answer")]
    res = stable_dedup(kept, sigs, fresh, fingerprint(_texts(fresh), CFG), CFG,
                       eval_fraction=1.0, inherited={3: "train"})
    assert res.keep.all()
    assert res.split == ["eval", "train", "eval"]  # shared prompt; inherited; hashed (all eval)


def test_only_rows_of_verified_pairs_and_examples_get_a_dedup_text(monkeypatch):
    """Every retained row's dedup text was made at each build (time and memory sized by the
    project, not by the change: most of the dedup stage of a +1 % build at 300k tasks). Now
    only the rows of pairs verified by exact Jaccard and of the examples get theirs."""
    from sftflow.tasks.dedup import stable

    made: list[str] = []
    real = stable.dedup_text
    monkeypatch.setattr(stable, "dedup_text",
                        lambda p, c, cfg: made.append(p) or real(p, c, cfg))
    rows = [_row(i, f"question {i} on topic {i * 7919}",
                 " ".join(f"w{(i * j) % 997}" for j in range(1, 40))) for i in range(2000)]
    kept, sigs = _retained(rows, ["train"] * len(rows))
    fresh = [_row(5000, "Q one", LONG + "!"),
             _row(5001, rows[3]["prompt"], rows[3]["completion"] + " w1 w2")]
    res = stable_dedup(kept, sigs, fresh, fingerprint(_texts(fresh), CFG), CFG,
                       eval_fraction=0.5)
    assert res.stats["rows"] == 2 and res.stats["retained"] == 2000
    assert res.keep.tolist() == [True, False] and res.against_parent[1]
    assert len(made) <= 4, f"{len(made)} dedup texts made for 2 fresh rows"
