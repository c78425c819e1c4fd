"""Issue 18, item 5, at the level of the tasks API reader: a listing is complete only when it
holds the ``total`` the server announced; a 404, failed or short page is never "no more
pages"; a count query that gets no answer is no count, never zero; and the watermark comes
from Label Studio's times only."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest

from sftflow.core.settings import get_settings
from sftflow.tasks.adapters.labelstudio import build_labelstudio
from sftflow.tasks.build.delta import (
    export_tasks,
    fetch_tasks,
    find_deleted,
    find_missing,
    list_task_ids,
    next_watermark,
    watermark,
)
from sftflow.tasks.ingest.projects import SFT_LABEL_CONFIG
from tests.conftest import unique
from tests.faults.gateway import Gateway
from tests.faults.proxy import Fault


def test_the_watermark_is_label_studio_time_less_the_overlap_and_never_goes_back():
    assert watermark("2026-01-01T00:00:10.5+00:00") == "2026-01-01T00:00:00.500000Z"
    prev = "2026-01-01T00:00:00.000000Z"
    assert next_watermark(prev, []) == prev  # nothing read: the parent's stays
    assert next_watermark(prev, ["", None]) == prev
    assert next_watermark(prev, ["2026-01-01T00:00:05Z"]) == prev  # 5 s - 10 s: not back
    assert next_watermark(prev, ["2026-01-01T00:01:00Z", "2026-01-01T00:00:30Z"]) \
        == "2026-01-01T00:00:50.000000Z"
    assert next_watermark("", ["2026-01-01T00:01:00Z"], overlap_s=30) \
        == "2026-01-01T00:00:30.000000Z"


def test_a_count_without_an_answer_is_no_answer():
    expected = list(range(100))
    assert find_missing(expected, lambda lo, hi: None)[0] is None
    answers = iter([100 - 1, None])  # the whole range short by one, then no answer
    assert find_missing(expected, lambda lo, hi: next(answers))[0] is None


@pytest.fixture()
def tasks(labelstudio):
    project = labelstudio.projects.create(title=unique("t-proof"), label_config=SFT_LABEL_CONFIG)
    try:
        ids = labelstudio.projects.import_tasks(
            id=project.id, request=[{"prompt": f"question {i}?"} for i in range(10)],
            return_task_ids=True).task_ids
        yield project.id, sorted(ids)
    finally:
        labelstudio.projects.delete(id=project.id)


def _client(proxy: Gateway):
    return build_labelstudio(get_settings().labelstudio.model_copy(update={"url": proxy.url}))


def _gateway(**kw) -> Gateway:
    up = urlparse(get_settings().labelstudio.url)
    return Gateway(up.hostname, up.port, **kw)


@pytest.mark.integration
def test_a_capped_page_size_is_paged_to_the_announced_total(tasks):
    project_id, ids = tasks
    with _gateway(page_cap=3) as gw:
        ls = _client(gw)
        got = fetch_tasks(ls, project_id, updated_after="2000-01-01T00:00:00.000000Z",
                          light=True)
        assert (sorted(int(t["id"]) for t in got.tasks), got.total, got.pages) == (ids, 10, 4)
        assert got.unproven == ""
        whole = export_tasks(ls, project_id, ids)  # by id, whole, through the export
        assert sorted(int(t["id"]) for t in whole.tasks) == ids and not whole.unproven
        assert list_task_ids(ls, project_id) == set(ids)


@pytest.mark.integration
def test_a_404_or_a_failed_page_leaves_the_listing_unproven(tasks):
    project_id, _ = tasks
    with _gateway(page_cap=3) as gw:
        ls = _client(gw)
        gw.add(Fault("status", "GET", r"api/tasks/\?.*[?&]page=2\b", times=0, status=404))
        got = fetch_tasks(ls, project_id, updated_after="2000-01-01T00:00:00.000000Z",
                          light=True)
        assert got.unproven == "page 2 answered 404 with 3 of 10 tasks read"
        assert list_task_ids(ls, project_id) is None  # not "the project holds 3 tasks"


@pytest.mark.integration
def test_an_export_by_id_that_fails_or_drops_a_task_is_no_proof(tasks, labelstudio):
    project_id, ids = tasks
    with _gateway() as gw:
        ls = _client(gw)
        assert export_tasks(ls, project_id, []).requests == 0  # none asked: no whole-project export
        gw.add(Fault("status", "GET", r"api/projects/\d+/export\?", times=0, status=400))
        assert export_tasks(ls, project_id, ids).unproven == "the export of 10 tasks answered 400"
        gw.clear()
        labelstudio.tasks.delete(id=ids[2])
        got = export_tasks(ls, project_id, ids)
        assert got.unproven == "1 of 10 tasks asked for did not come back"
        assert sorted(int(t["id"]) for t in got.tasks) == ids[:2] + ids[3:]


@pytest.mark.integration
def test_a_count_query_answered_404_names_no_task_deleted(tasks, labelstudio):
    project_id, ids = tasks
    labelstudio.tasks.delete(id=ids[4])
    with _gateway() as gw:
        ls = _client(gw)
        assert find_deleted(ls, project_id, ids) == {ids[4]}
        gw.add(Fault("status", "GET", r"api/tasks/\?", times=0, status=404))
        assert find_deleted(ls, project_id, ids) is None  # before: every task "deleted"
