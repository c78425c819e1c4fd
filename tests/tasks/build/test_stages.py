"""tasks.build: the pure stages between export and commit (no services, no Prefect)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from sftflow.tasks.build import stages as build
from sftflow.tasks.build.delta import TaskState
from sftflow.tasks.build.filters import FilterConfig, filter_rows
from sftflow.tasks.build.incremental import ParentState
from sftflow.tasks.dedup import DedupConfig, fingerprint
from sftflow.tasks.versions import formats


def _row(i: int, prompt: str, completion: str, **kw) -> dict:
    return {"prompt": prompt, "completion": completion, "prompt_id": kw.pop("pid", f"p{i}"),
            "task_id": i, "annotation_id": 1000 + i, "annotator": "1",
            "updated_at": kw.pop("updated_at", "2026-01-01T00:00:00Z"),
            "ground_truth": kw.pop("gt", False),
            "draft_model": None, "draft_similarity": None, "draft_unchanged": None}


def _state(row: dict, tag: str = "") -> TaskState:
    return TaskState(row["task_id"], f"{row['task_id']:08x}{tag:0>8}"[:16], 1, 0, row["updated_at"])


def _split(rows, cfg=None, shard=3, eval_fraction=0.5, parent=None, reread=None):
    """``stable_split`` as the flow runs it: fingerprints per shard, then one call. Without a
    parent it is a scratch build; with one, the tasks in ``reread`` are read again."""
    cfg = cfg or DedupConfig()
    texts = build.dedup_texts(rows, cfg)
    fps = [fingerprint(list(t), cfg) for t in build.chunks(texts, shard)] if rows else []
    parent = parent or ParentState(version="")
    states = {r["task_id"]: _state(r, "new") for r in rows}
    reread = set(states) if reread is None else reread
    plan = build.Plan("incremental" if parent.version else "scratch", "", parent)
    changes = build.Changes(plan.mode, "", [], states, set(), reread, "")
    return build.stable_split(plan, changes, rows, fps, cfg, eval_fraction, 0)


def _parent(out) -> ParentState:
    """A committed version of ``out`` as the next build loads it."""
    sigs = np.stack([out.signatures[r["row_hash"]] for r in out.rows])
    return ParentState(version="v1", rows=list(out.rows), sigs=sigs, tasks=dict(out.tasks))


def test_chunks():
    assert build.chunks([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert build.chunks([], 2) == [[]]


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


def test_merge_filtered_and_counts():
    rows = [_row(0, "Echo", "Echo"), _row(1, "Q?", "A real answer.")]
    results = [filter_rows(c, FilterConfig()) for c in build.chunks(rows, 1)]
    kept, excluded, counts = build.merge_filtered(
        [{"stage": "export", "reason": "x"}, {"stage": "filter", "reason": "policy"}], results)
    assert [r["task_id"] for r in kept] == [1]
    assert [e["reason"] for e in excluded] == ["x", "policy", "response_equals_prompt"]
    # an export exclusion is the export's count; a filter-stage one given in is a filter drop
    assert counts == {"kept": 1, "dropped:response_equals_prompt": 1, "dropped:policy": 1}


def test_report_figures():
    stats = {"rows": 3, "kept": 2, "dropped": {"exact_duplicate": 1, "near_duplicate": 0},
             "clusters_removed": 1, "examples": [], "split_groups": 2}
    assert build.dedup_counts(stats) == {
        "rows": 3, "kept": 2, "clusters_removed": 1, "split_groups": 2,
        "dropped:exact_duplicate": 1, "dropped:near_duplicate": 0}
    table = build.counts_table({"export": {"tasks": 3, "note": "x"}, "rows": {"train": 2}})
    assert table == [{"stage": "export", "count": "tasks", "value": 3},
                     {"stage": "version", "count": "rows_train", "value": 2}]
    assert "no version made: project 'p' has no usable annotations (5 annotations exported, " \
           "0 rows passed" in build.nothing_to_build("p", {"export": {"annotations": 5}})


def test_project_source_records_the_counters():
    project = SimpleNamespace(id="7", title="t", task_number=10, num_tasks_with_annotations=4,
                              total_annotations_number=5, finished_task_number=None)
    assert build.project_source("http://ls", project) == {
        "labelstudio_url": "http://ls", "project_id": 7, "project_title": "t",
        "task_number": 10, "num_tasks_with_annotations": 4, "total_annotations_number": 5,
        "finished_task_number": 0, "skipped_annotations_number": 0}
