"""tasks.build: the pure stages between export and commit (no services, no Prefect)."""

from __future__ import annotations

from types import SimpleNamespace

from sftflow.tasks.build import stages as build
from sftflow.tasks.build.filters import FilterConfig, filter_rows
from sftflow.tasks.dedup import DedupConfig, fingerprint
from sftflow.tasks.versions import formats


def _row(i: int, prompt: str, completion: str, **kw) -> dict:
    return {"prompt": prompt, "completion": completion, "prompt_id": kw.pop("pid", f"p{i}"),
            "task_id": i, "annotation_id": 1000 + i, "annotator": "1",
            "updated_at": kw.pop("updated_at", "2026-01-01T00:00:00Z"),
            "ground_truth": kw.pop("gt", False),
            "draft_model": None, "draft_similarity": None, "draft_unchanged": None}


def _split(rows, cfg=None, shard=3, eval_fraction=0.5):
    cfg = cfg or DedupConfig()
    texts = build.dedup_texts(rows, cfg)
    fps = [fingerprint(list(t), cfg) for t in build.chunks(texts, shard)]
    return build.dedup_and_split(rows, fps, cfg, eval_fraction, 0)


def test_chunks():
    assert build.chunks([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert build.chunks([], 2) == [[]]


def test_dedup_and_split_keeps_one_of_each_duplicate_and_stores_full_rows():
    rows = [_row(i, f"Question {i} about a distinct topic number {i}?",
                 f"Answer {i} with enough words to shingle, topic {i}.") for i in range(20)]
    rows.append(_row(99, rows[0]["prompt"], rows[0]["completion"], updated_at="2027-01-01"))
    out = _split(rows, DedupConfig(normalize_digits=False))  # rows differ only in numbers
    assert len(out.rows) == 20 and out.stats["dropped"]["exact_duplicate"] == 1
    kept = next(r for r in out.rows if r["prompt"] == rows[0]["prompt"])
    assert kept["task_id"] == 99  # the latest updated_at wins
    assert list(kept) == list(formats.COLUMNS) and kept["row_hash"] == formats.row_hash(kept)
    assert out.exclusions == [{"stage": "dedup", "reason": "duplicate", "task_id": 0,
                               "annotation_id": 1000, "cluster_id": kept["cluster_id"]}]
    assert {r["split"] for r in out.rows} == {"train", "eval"}
    assert out.stats["leakage_clusters"] == out.stats["leakage_prompts"] == 0
    assert out.stats["split_groups"] == 20


def test_answers_to_one_prompt_share_a_split():
    rows = [_row(i, f"Shared prompt {i // 4} asks something specific here?",
                 f"Distinct answer {i} written in its own words entirely.", pid=f"p{i // 4}")
            for i in range(40)]
    # prompts and answers differ only in their numbers: near-duplicates once digits are read as 0
    out = _split(rows, DedupConfig(normalize_digits=False), eval_fraction=0.3)
    sides: dict[str, set] = {}
    for r in out.rows:
        sides.setdefault(r["prompt_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in sides.values()) and out.stats["split_groups"] == 10


def test_the_stored_cluster_id_does_not_move_when_a_worse_twin_joins():
    base = [_row(i, f"Prompt {i} on its own subject matter?", f"Reply {i} on its own subject.")
            for i in range(10)]
    first = _split(base)
    twin = _row(50, base[3]["prompt"], base[3]["completion"], updated_at="2020-01-01")
    second = _split([*base, twin])
    assert {r["row_hash"] for r in first.rows} == {r["row_hash"] for r in second.rows}


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
