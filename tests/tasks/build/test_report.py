"""tasks.build.report: the build's figures and the manifest's source record."""

from __future__ import annotations

from types import SimpleNamespace

from sftflow.tasks.build import report


def test_report_figures():
    stats = {"rows": 3, "kept": 2, "dropped": {"exact_duplicate": 1, "near_duplicate": 0},
             "clusters_removed": 1, "examples": [], "split_groups": 2}
    assert report.dedup_counts(stats) == {
        "rows": 3, "kept": 2, "clusters_removed": 1, "split_groups": 2,
        "dropped:exact_duplicate": 1, "dropped:near_duplicate": 0}
    table = report.counts_table({"export": {"tasks": 3, "note": "x"}, "rows": {"train": 2}})
    assert table == [{"stage": "export", "count": "tasks", "value": 3},
                     {"stage": "version", "count": "rows_train", "value": 2}]
    assert "no version made: project 'p' has no usable annotations (5 annotations exported, " \
           "0 rows passed" in report.nothing_to_build("p", {"export": {"annotations": 5}})


def test_project_source_records_the_counters():
    project = SimpleNamespace(id="7", title="t", task_number=99)  # the counters come apart
    counters = {"task_number": 10, "num_tasks_with_annotations": 4,
                "total_annotations_number": 5, "finished_task_number": None}
    assert report.project_source("http://ls", project, counters) == {
        "labelstudio_url": "http://ls", "project_id": 7, "project_title": "t",
        "task_number": 10, "num_tasks_with_annotations": 4, "total_annotations_number": 5,
        "finished_task_number": 0, "skipped_annotations_number": 0}
