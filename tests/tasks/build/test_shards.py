"""tasks.build.shards: rows cut into shards, filtered shards merged with their counts."""

from __future__ import annotations

from sftflow.tasks.build.filters import FilterConfig, filter_rows
from sftflow.tasks.build.shards import chunks, merge_filtered
from tests.tasks._datasets import exported_row

_row = exported_row


def test_chunks():
    assert chunks([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert chunks([], 2) == [[]]


def test_merge_filtered_and_counts():
    rows = [_row(0, "Echo", "Echo"), _row(1, "Q?", "A real answer.")]
    results = [filter_rows(c, FilterConfig()) for c in chunks(rows, 1)]
    kept, excluded, counts = merge_filtered(
        [{"stage": "export", "reason": "x"}, {"stage": "filter", "reason": "policy"}], results)
    assert [r["task_id"] for r in kept] == [1]
    assert [e["reason"] for e in excluded] == ["x", "policy", "response_equals_prompt"]
    # an export exclusion is the export's count; a filter-stage one given in is a filter drop
    assert counts == {"kept": 1, "dropped:response_equals_prompt": 1, "dropped:policy": 1}
