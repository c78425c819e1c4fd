"""Export snapshots and the streaming parse of Label Studio's JSON export."""

from __future__ import annotations

import io
import itertools
import json

import pytest

from sftflow.core.errors import SftflowError
from sftflow.tasks.build.export import (
    iter_json_array,
    parse_export_file,
    parse_tasks,
    task_rows,
)
from sftflow.tasks.ingest.prompts import prompt_id
from tests.conftest import unique
from tests.tasks._datasets import annotation, make_project, textarea


def _task(tid: int, anns: list, prompt: object = "What is 2+2?", **data) -> dict:
    ann_list = []
    for j, a in enumerate(anns):
        if not isinstance(a, dict):
            ann_list.append(a)
            continue
        a = dict(a)
        a.setdefault("id", tid * 10 + j)
        a.setdefault("completed_by", 7)
        a.setdefault("updated_at", f"2026-01-0{j + 1}T00:00:00Z")
        ann_list.append(a)
    d = {"prompt": prompt, **data} if prompt is not None else dict(data)
    return {"id": tid, "data": d, "annotations": ann_list, "drafts": []}


def test_iter_json_array_matches_json_loads_at_any_chunk_size():
    doc = [_task(i, [annotation(f"réponse {i} 中文 ✓")]) for i in range(50)]
    raw = json.dumps(doc, ensure_ascii=False, indent=1).encode()
    for size in (1, 7, 64, 1 << 20):
        assert list(iter_json_array(io.BytesIO(raw), chunk_size=size)) == doc
    assert list(iter_json_array(io.BytesIO(b" [ ] "))) == []


@pytest.mark.parametrize("raw", [b'{"a": 1}', b'[{"id": 1}, {"id": 2', b"", b"[1,"])
def test_iter_json_array_rejects_non_arrays_and_truncation(raw):
    with pytest.raises(ValueError):
        list(iter_json_array(io.BytesIO(raw), chunk_size=4))


def test_policies_pick_latest_ground_truth_or_all():
    t = _task(1, [annotation("first", ground_truth=True), annotation("second"),
                  annotation("third", cancelled=True)])
    latest = task_rows(t, "latest")
    assert [r["completion"] for r in latest.rows] == ["second"]
    assert latest.counts["cancelled"] == 1 and latest.counts["superseded_annotations"] == 1
    assert [r["completion"] for r in task_rows(t, "ground_truth_first").rows] == ["first"]
    every = task_rows(t, "all").rows
    assert [r["completion"] for r in every] == ["first", "second"]
    row = every[0]
    assert row["task_id"] == 1 and row["annotation_id"] == 10 and row["annotator"] == "7"
    assert row["updated_at"] == "2026-01-01T00:00:00.000000Z" and row["ground_truth"] is True
    assert row["prompt_id"] == prompt_id("What is 2+2?")  # computed when ingest did not set it


def test_an_edited_prompt_is_re_identified():
    """Issue 18, item 15: a row's prompt_id is the id of the text the task holds now."""
    stored = prompt_id("What is 2+2?")  # what ingest wrote into the task data
    unedited = task_rows(_task(1, [annotation("4")], prompt_id=stored)).rows[0]
    assert unedited["prompt_id"] == stored  # the id it always had
    edited = task_rows(_task(2, [annotation("5")], prompt="What is 2+3?", prompt_id=stored)).rows[0]
    assert edited["prompt_id"] == prompt_id("What is 2+3?") != stored
    # whatever the stored data says: an id that is not the text's is not the row's
    given = task_rows(_task(3, [annotation("x")], prompt_id="given")).rows[0]
    assert given["prompt_id"] == prompt_id("What is 2+2?")


def test_multi_part_text_is_joined_and_drafts_are_not_rows():
    t = _task(1, [annotation(None, result=[textarea(["line one", "line two"])])])
    t["drafts"] = [{"result": [textarea(["draft"])]}]
    out = task_rows(t)
    assert [r["completion"] for r in out.rows] == ["line one\nline two"]
    assert out.counts["drafts_ignored"] == 1


def test_malformed_rows_are_counted_and_excluded_never_raised():
    tasks = [
        _task(1, [annotation("ok")]),
        _task(2, [annotation("x")], prompt=None, text="no prompt field"),
        _task(3, [annotation("x")], prompt=42),
        _task(4, [annotation(None, result=[textarea("not a list")])]),
        _task(5, [annotation(None, result=[textarea(["x"], from_name="other")])]),
        _task(6, [annotation(None, result=[textarea(["x"], type_="choices")])]),
        _task(7, [annotation(None, result="garbage")]),
        _task(8, ["not an annotation"]),
        "not a task",
        _task(9, []),
    ]
    out = parse_tasks(tasks)
    assert [r["task_id"] for r in out.rows] == [1]
    expected = {"missing_prompt": 2, "malformed_text": 1, "unknown_from_name": 1,
                "wrong_result_type": 1, "malformed_result": 1, "malformed_annotation": 1,
                "malformed_task": 1}
    assert {k.split(":", 1)[1]: v for k, v in out.counts.items()
            if k.startswith("excluded:")} == expected
    assert sorted(e["reason"] for e in out.exclusions) == sorted(
        r for r, n in expected.items() for _ in range(n))
    assert out.counts["tasks"] == 10 and out.counts["tasks_without_annotations"] == 1


def _prediction(pid: int, model: str, text: str | None) -> dict:
    return {"id": pid, "model_version": model, "result": [textarea([text])] if text else []}


def test_rows_record_the_draft_they_started_from_and_tasks_their_annotator_pairs():
    t = _task(1, [dict(annotation("abcd"), parent_prediction=501, completed_by=7),
                  dict(annotation("abce"), parent_prediction=502, completed_by=8),
                  dict(annotation("wxyz"), completed_by=9),
                  dict(annotation("skip", cancelled=True), completed_by=10)])
    t["predictions"] = [_prediction(501, "job-a", "abcd"), _prediction(502, "job-b", "abcf")]
    out = task_rows(t, "all")
    assert [(r["annotator"], r["draft_model"], r["draft_similarity"], r["draft_unchanged"])
            for r in out.rows] == [("7", "job-a", 1.0, True), ("8", "job-b", 0.75, False),
                                   ("9", None, None, None)]
    assert out.counts["rows_with_model_draft"] == 2
    assert out.counts["rows_model_draft_unchanged"] == 1
    # Every usable annotation makes the pairs (the cancelled one does not), whatever is picked.
    latest = task_rows(t, "latest")
    assert [r["annotator"] for r in latest.rows] == ["9"]
    assert latest.agreement == out.agreement == {1: [
        ("7", "8", 0.75), ("7", "9", 0.0), ("8", "9", 0.0)]}
    single = task_rows(_task(2, [annotation("alone")]))
    assert single.agreement == {} and single.rows[0]["draft_model"] is None
    merged = parse_tasks([t, _task(2, [annotation("alone")])], "latest")
    assert set(merged.agreement) == {1}


def test_a_draft_missing_from_the_export_is_counted_and_the_row_kept_without_draft():
    t = _task(1, [dict(annotation("Paris."), parent_prediction=501)])
    t["predictions"] = [501]  # a snapshot made without whole predictions lists their ids
    out = task_rows(t)
    assert out.rows[0]["draft_model"] is None and out.counts["model_draft_missing"] == 1
    t["predictions"] = [_prediction(501, "job-a", None)]  # a draft with no response text
    row = task_rows(t).rows[0]
    assert (row["draft_model"], row["draft_similarity"], row["draft_unchanged"]) == (
        "job-a", None, None)


def test_parse_export_file_names_the_file_when_not_json(tmp_path):
    bad = tmp_path / "export.json"
    bad.write_text("<html>oops</html>")
    with pytest.raises(SftflowError, match="export.json"):
        parse_export_file(bad)


@pytest.mark.integration
def test_snapshot_roundtrip_on_real_labelstudio(labelstudio, tmp_path):
    from sftflow.tasks.build.export import create_snapshot, delete_snapshot, download_snapshot

    tasks = [{"data": {"prompt": f"p{i}"}, "annotations": [annotation(f"answer {i}")]}
             for i in range(30)]
    tasks.append({"data": {"prompt": "skipped"},
                  "annotations": [annotation("no", cancelled=True)]})
    tasks.append({"data": {"prompt": "unannotated"}})
    project = make_project(labelstudio, unique("t"), tasks)
    try:
        snap = create_snapshot(labelstudio, project.id, timeout_s=120)
        assert snap.export_id > 0 and snap.created_at
        path = download_snapshot(labelstudio, snap, tmp_path / "e.json")
        out = parse_export_file(path)
        assert sorted(r["completion"] for r in out.rows) == sorted(f"answer {i}" for i in range(30))
        assert out.counts["cancelled"] == 1 and out.counts["tasks"] == 32
        assert delete_snapshot(labelstudio, snap)
    finally:
        labelstudio.projects.delete(id=project.id)


# -- snapshot creation through the fault proxy (issue #10, item 12) -------------------------------
@pytest.fixture()
def small_project(labelstudio):
    tasks = [{"data": {"prompt": f"p{i}"}, "annotations": [annotation(f"answer {i}")]}
             for i in range(5)]
    project = make_project(labelstudio, unique("t-snap"), tasks)
    yield project
    labelstudio.projects.delete(id=project.id)


@pytest.fixture()
def ls_proxy(stack):
    from urllib.parse import urlparse

    from sftflow.tasks.adapters.labelstudio import build_labelstudio
    from tests.faults.proxy import FaultProxy

    up = urlparse(stack.labelstudio.url)
    with FaultProxy(up.hostname, up.port) as proxy:
        # A client whose own request timeout (2 s) is far below the export deadline.
        client = build_labelstudio(stack.labelstudio.model_copy(
            update={"url": proxy.url, "timeout_s": 2.0}))
        yield proxy, client


CREATE = r"/api/projects/\d+/exports/?$"


@pytest.mark.integration
def test_a_snapshot_create_slower_than_the_client_timeout_waits_within_the_deadline(
        labelstudio, small_project, ls_proxy):
    """Without an export queue Label Studio builds the snapshot inside the create request:
    the request may take longer than the client's timeout, while the deadline allows it."""
    from sftflow.tasks.build.export import create_snapshot
    from tests.faults.proxy import Fault

    proxy, client = ls_proxy
    proxy.add(Fault("slow_response", method="POST", path=CREATE, seconds=4))
    snap = create_snapshot(client, small_project.id, timeout_s=60)
    assert proxy.applied["slow_response"] == 1
    exports = labelstudio.projects.exports.list(id=small_project.id)
    assert [e.id for e in exports] == [snap.export_id]  # one snapshot, not one per attempt


@pytest.mark.integration
def test_a_lost_create_response_reuses_the_snapshot_the_server_made(
        labelstudio, small_project, ls_proxy):
    from sftflow.tasks.build.export import create_snapshot
    from tests.faults.proxy import Fault

    proxy, client = ls_proxy
    proxy.add(Fault("lose_response", method="POST", path=CREATE, status=504))
    snap = create_snapshot(client, small_project.id, timeout_s=60)
    assert proxy.applied["lose_response"] == 1
    exports = labelstudio.projects.exports.list(id=small_project.id)
    assert [e.id for e in exports] == [snap.export_id]


@pytest.mark.integration
def test_the_export_deadline_covers_the_create_request_and_its_retries(small_project, ls_proxy):
    import time

    from sftflow.tasks.build.export import create_snapshot
    from tests.faults.proxy import Fault

    proxy, client = ls_proxy
    proxy.add(Fault("slow_response", method="POST", path=CREATE, seconds=12, times=0))
    start = time.monotonic()
    with pytest.raises(SftflowError, match="deadline"):
        create_snapshot(client, small_project.id, timeout_s=5)
    assert time.monotonic() - start < 9


def test_the_export_deadline_grows_with_the_project_and_stays_bounded():
    from sftflow.tasks.build.export import export_deadline

    assert export_deadline(0) == export_deadline(55_000) == export_deadline(90_000) == 900.0
    # issue #21's largest project: its export stage took 850 s quiet and 1,218 s loaded
    assert export_deadline(300_000) == 3_000.0
    assert export_deadline(1_000_000) == 10_000.0
    assert export_deadline(10_000_000) == export_deadline(10**9) == 6 * 3600.0
    sizes = range(0, 10_000_000, 250_000)
    assert all(export_deadline(a) <= export_deadline(b) for a, b in itertools.pairwise(sizes))
