"""Issue 18, item 5: an incremental build proves it saw every annotation edit, or falls back to
a full export and says why. On the real stack, with a gateway (``FaultProxy``) in front of
Label Studio that caps the tasks API's page size, answers 404 for a later page of the
changed-tasks listing, or stamps its own, skewed clock in the ``Date`` header. Every case
edits annotations only: the project counters do not move, so reconciling them cannot catch
a missed edit. In each, the incremental build's version must equal a ``--full`` build's (of a
second dataset built alongside from the start: the same parent rows, the same stable split)."""

from __future__ import annotations

import contextlib
from urllib.parse import urlparse

import pytest

from sftflow.core.settings import get_settings
from tests.conftest import unique
from tests.faults.gateway import Gateway
from tests.faults.proxy import Fault
from tests.flows.test_build_incremental import _build, _qa, _tasks
from tests.tasks._datasets import make_project, textarea

pytestmark = [pytest.mark.integration, pytest.mark.prefect]

@contextlib.contextmanager
def through(gateway: Gateway, monkeypatch):
    """Builds inside talk to Label Studio through ``gateway``."""
    with gateway:
        monkeypatch.setenv("SFTFLOW_LABELSTUDIO__URL", gateway.url)
        get_settings.cache_clear()
        try:
            yield gateway
        finally:
            monkeypatch.undo()  # the URL as it was (a stack on other ports sets it too)
            get_settings.cache_clear()


def _gateway(**kw) -> Gateway:
    up = urlparse(get_settings().labelstudio.url)
    return Gateway(up.hostname, up.port, **kw)


@pytest.fixture()
def project(labelstudio):
    p = make_project(labelstudio, unique("proof"), [_qa(i) for i in range(24)])
    yield p
    labelstudio.projects.delete(id=p.id)


def _edit(labelstudio, project, n: int, tag: str) -> list[int]:
    """Rewrite the first annotation of the ``n`` tasks with the highest ids (the last pages of
    a listing ordered by id): count-neutral edits."""
    tasks = sorted((t for t in _tasks(labelstudio, project) if t.annotations),
                   key=lambda t: t.id)[-n:]
    for t in tasks:
        labelstudio.annotations.update(id=t.annotations[0]["id"], result=[textarea(
            [f"{tag}: a rewritten answer for task {t.id}, with new words about {tag}."])])
    return [t.id for t in tasks]


def test_a_capped_page_size_still_lists_every_edit(prefect_harness, s3, labelstudio, project,
                                                    monkeypatch):
    """Label Studio (or a gateway) serves 4 tasks a page whatever the client asks: the listing
    keeps paging until it holds the ``total`` the server announced."""
    _build(s3, project, "inc"), _build(s3, project, "full", "full")
    _edit(labelstudio, project, 6, "capped")
    with through(_gateway(page_cap=4), monkeypatch):
        inc = _build(s3, project, "inc")
    full = _build(s3, project, "full", "full")
    assert inc.mode == "incremental", inc.mode_reason
    assert inc.version == full.version, "an edit beyond the first page was missed"
    assert inc.counts["changes"]["rows_changed"] == 6
    listed, pages = inc.counts["changes"]["tasks_listed"], inc.counts["changes"]["pages_listed"]
    assert listed >= 6 and pages == -(-listed // 4)  # every page of 4 read, to the total
    assert "change list proven: the listing of the tasks updated since " in inc.mode_reason
    assert f"holds all {listed} of {listed} ({pages} pages)" in inc.mode_reason, inc.mode_reason


def test_a_404_on_a_later_page_falls_back_to_a_full_export(prefect_harness, s3, labelstudio,
                                                             project, monkeypatch):
    """A 404 before the announced total is in is not the end of the listing: the build cannot
    prove its change list and takes a full export, and its report says why."""
    _build(s3, project, "inc"), _build(s3, project, "full", "full")
    _edit(labelstudio, project, 6, "lost page")
    with through(_gateway(page_cap=4), monkeypatch) as gw:
        gw.add(Fault("status", "GET", r"api/tasks/\?.*updated_at.*[?&]page=2\b", times=0,
                     status=404))
        inc = _build(s3, project, "inc")
    full = _build(s3, project, "full", "full")
    assert inc.version == full.version, "an edit on the lost page was missed"
    assert gw.applied["status"] >= 1
    assert inc.mode == "full", inc.mode_reason
    assert "not proven" in inc.mode_reason and "page 2 answered 404" in inc.mode_reason, \
        inc.mode_reason
    nxt = _build(s3, project, "inc")  # and the next build is incremental again
    assert nxt.mode == "incremental" and nxt.version == full.version, nxt.mode_reason


def test_a_gateway_clock_ahead_of_label_studio_hides_no_edit(prefect_harness, s3, labelstudio,
                                                              project, monkeypatch):
    """The gateway's ``Date`` runs 2 minutes ahead of Label Studio's clock: the watermark is
    taken from Label Studio's own times (the ``updated_at`` it returned), so an edit made right
    after a build is still newer than that build's watermark."""
    first, _ = _build(s3, project, "inc"), _build(s3, project, "full", "full")
    _edit(labelstudio, project, 2, "before")  # a new version: its watermark is recorded
    with through(_gateway(date_skew_s=120.0), monkeypatch):
        second = _build(s3, project, "inc")
    assert second.mode == "incremental" and second.version != first.version, second.mode_reason
    _edit(labelstudio, project, 1, "after")
    third, full = _build(s3, project, "inc"), _build(s3, project, "full", "full")
    assert third.mode == "incremental", third.mode_reason
    assert third.version == full.version, "the edit made after the skewed build was missed"
    assert third.counts["changes"]["rows_changed"] == 1
