"""tasks.build.split: the rows a version stores, fresh rows against the parent's retained rows
(``stable_split``, as the flow runs it); pure, no services, no Prefect."""

from __future__ import annotations

import numpy as np

from sftflow.tasks.build.changes import Changes
from sftflow.tasks.build.delta import TaskState
from sftflow.tasks.build.incremental import ParentState
from sftflow.tasks.build.plan import Plan
from sftflow.tasks.build.shards import chunks, dedup_texts
from sftflow.tasks.build.split import stable_split
from sftflow.tasks.dedup import DedupConfig, fingerprint
from sftflow.tasks.versions import formats
from tests.tasks._datasets import exported_row

_row = exported_row


def _state(row: dict, tag: str = "") -> TaskState:
    return TaskState(row["task_id"], f"{row['task_id']:08x}{tag:0>8}"[:16], 1, 0, row["updated_at"])


def _split(rows, cfg=None, shard=3, eval_fraction=0.5, parent=None, reread=None):
    """``stable_split`` as the flow runs it: fingerprints per shard, then one call. Without a
    parent it is a scratch build; with one, the tasks in ``reread`` are read again."""
    cfg = cfg or DedupConfig()
    texts = dedup_texts(rows, cfg)
    fps = [fingerprint(list(t), cfg) for t in chunks(texts, shard)] if rows else []
    parent = parent or ParentState(version="")
    states = {r["task_id"]: _state(r, "new") for r in rows}
    reread = set(states) if reread is None else reread
    plan = Plan("incremental" if parent.version else "scratch", "", parent)
    changes = Changes(plan.mode, "", [], states, set(), reread, "")
    return stable_split(plan, changes, rows, fps, cfg, eval_fraction, 0)


def _parent(out) -> ParentState:
    """A committed version of ``out`` as the next build loads it."""
    sigs = np.stack([out.signatures[r["row_hash"]] for r in out.rows])
    return ParentState(version="v1", rows=list(out.rows), sigs=sigs, tasks=dict(out.tasks))


def test_stable_split_keeps_one_of_each_duplicate_and_stores_full_rows():
    rows = [_row(i, f"Question {i} about a distinct topic number {i}?",
                 f"Answer {i} with enough words to shingle, topic {i}.") for i in range(20)]
    rows.append(_row(99, rows[0]["prompt"], rows[0]["completion"], updated_at="2027-01-01"))
    out = _split(rows, DedupConfig(normalize_digits=False))  # rows differ only in numbers
    assert len(out.rows) == 20 and out.stats["dropped"]["exact_duplicate"] == 1
    kept = next(r for r in out.rows if r["prompt"] == rows[0]["prompt"])
    assert kept["task_id"] == 99  # the latest updated_at wins
    assert list(kept) == list(formats.COLUMNS) and kept["row_hash"] == formats.row_hash(kept)
    assert out.exclusions == [{"stage": "dedup", "reason": "duplicate", "task_id": 0,
                               "annotation_id": 1000, "cluster_id": kept["cluster_id"],
                               "detail": "exact duplicate of a new row"}]
    assert {r["split"] for r in out.rows} == {"train", "eval"}
    assert out.stats["leakage_clusters"] == out.stats["leakage_prompts"] == 0
    # every task is indexed: its split, and the twin its dropped row duplicates
    assert set(out.tasks) == {r["task_id"] for r in rows}
    assert out.tasks[0]["twins"] == kept["cluster_id"] and out.tasks[0]["split"] == kept["split"]
    assert out.figures["rows_added"] == 20 and out.figures["rows_removed"] == 0
    assert set(out.signatures) == {r["row_hash"] for r in out.rows}


def test_answers_to_one_prompt_share_a_split():
    rows = [_row(i, f"Shared prompt {i // 4} asks something specific here?",
                 f"Distinct answer {i} written in its own words entirely.", pid=f"p{i // 4}")
            for i in range(40)]
    # prompts and answers differ only in their numbers: near-duplicates once digits are read as 0
    out = _split(rows, DedupConfig(normalize_digits=False), eval_fraction=0.3)
    sides: dict[str, set] = {}
    for r in out.rows:
        sides.setdefault(r["prompt_id"], set()).add(r["split"])
    assert len(sides) == 10 and all(len(s) == 1 for s in sides.values())


def test_the_stored_cluster_id_does_not_move_when_a_worse_twin_joins():
    base = [_row(i, f"Prompt {i} on its own subject matter?", f"Reply {i} on its own subject.")
            for i in range(10)]
    first = _split(base)
    twin = _row(50, base[3]["prompt"], base[3]["completion"], updated_at="2020-01-01")
    second = _split([*base, twin])
    assert {r["row_hash"] for r in first.rows} == {r["row_hash"] for r in second.rows}


def test_an_incremental_split_keeps_the_parents_rows_and_drops_twins_of_them():
    base = [_row(i, f"Prompt {i} on its own subject matter?", f"Reply {i} on its own subject.")
            for i in range(12)]
    first = _split(base, eval_fraction=0.3)
    # task 3 is edited, task 40 is new, task 41 repeats a retained row word for word
    edited = _row(3, "An entirely new question about gardening in spring?",
                  "Plant after the last frost.")
    twin = _row(41, base[5]["prompt"], base[5]["completion"], updated_at="2020-01-01")
    new = _row(40, "What is the capital of a country far away?", "It depends on the country.")
    fresh = [edited, new, twin]
    out = _split(fresh, parent=_parent(first), reread={3, 40, 41}, eval_fraction=0.3)
    by_task = {r["task_id"]: r for r in out.rows}
    retained = {r["row_hash"]: r for r in first.rows if r["task_id"] != 3}
    # the parent's other rows are kept as they were: same row, same split
    assert {h: r for h, r in ((r["row_hash"], r) for r in out.rows) if h in retained} == retained
    assert by_task[3]["prompt"] == edited["prompt"] and 40 in by_task and 41 not in by_task
    [dup] = out.exclusions
    assert dup["task_id"] == 41 and dup["cluster_id"] == by_task[5]["cluster_id"]
    assert dup["detail"] == "exact duplicate of a row of the parent version"
    assert out.tasks[41]["split"] == by_task[5]["split"]  # a twin's task follows its row
    assert out.figures == {"tasks_read": 0, "tasks_deleted": 0, "rows_exported": 3,
                           "rows_added": 1, "rows_changed": 1, "rows_removed": 0,
                           "rows_retained": 11}
