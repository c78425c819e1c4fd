"""wait_for_annotations against the real Label Studio and a real Prefect API (test harness)."""

from __future__ import annotations

import contextlib
import threading

import pytest

from sftflow.core.errors import ConfigError
from sftflow.flows import wait_for_annotations as wait_module
from sftflow.flows.wait_for_annotations import WaitParams, wait_for_annotations
from sftflow.tasks.ingest.projects import SFT_LABEL_CONFIG
from tests.conftest import unique

pytestmark = [pytest.mark.integration, pytest.mark.prefect]


def annotate(client, task_id: int, text: str = "a response", cancelled: bool = False) -> None:
    client.annotations.create(
        id=task_id, was_cancelled=cancelled,
        result=[{"from_name": "instruction", "to_name": "prompt", "type": "textarea",
                 "value": {"text": [text]}}],
    )


@pytest.fixture()
def project(labelstudio):
    p = labelstudio.projects.create(title=unique("t-wait"), label_config=SFT_LABEL_CONFIG)
    ids = labelstudio.projects.import_tasks(
        id=p.id, request=[{"prompt": f"prompt {i}"} for i in range(5)], return_task_ids=True
    ).task_ids
    yield p, ids
    with contextlib.suppress(Exception):  # the test may have deleted it
        labelstudio.projects.delete(id=p.id)


def fast(**kw) -> WaitParams:
    return WaitParams(**{"min_interval_s": 0.3, "max_interval_s": 1.0, **kw})


def test_idle_annotators_end_in_the_not_enough_state(prefect_harness, labelstudio, project):
    p, ids = project
    annotate(labelstudio, ids[0])
    annotate(labelstudio, ids[1], cancelled=True)  # cancelled (skipped) ones do not count
    state = wait_for_annotations(fast(project=p.title, min_new=3, timeout_s=3), return_state=True)
    report = state.result()
    assert state.is_completed() and state.name == "NotEnough"
    assert state.message == report.message == "not enough annotations yet: 1 of 3"
    assert (report.reached, report.current, report.new, report.project_id) == (False, 1, 1, p.id)
    assert 2 <= report.polls <= 3 / 0.3 + 2 and report.failed_polls == 0


def test_completes_when_annotations_arrive(prefect_harness, labelstudio, project, monkeypatch):
    p, ids = project
    first_poll = threading.Event()
    watch_progress = wait_module.watch_progress

    def watching(*args, on_progress, **kwargs):  # the flow's watch, telling us of each poll
        def polled(progress) -> None:
            on_progress(progress)
            first_poll.set()
        return watch_progress(*args, on_progress=polled, **kwargs)

    monkeypatch.setattr(wait_module, "watch_progress", watching)

    def annotators() -> None:
        # They arrive once the flow has seen too few (not after a fixed pause, which a slow
        # flow start on a busy machine could outlast).
        if not first_poll.wait(240):
            return  # the flow never polled: its report says so below
        for i in ids[:3]:
            annotate(labelstudio, i)

    worker = threading.Thread(target=annotators)
    worker.start()
    # The deadline is far: a passing run ends within seconds, and in one CI run a single
    # Prefect API call (the progress artifact's update after the second poll) took 62 s, so
    # a 60 s deadline reported a wait that had succeeded as late. (60 s is both the Prefect
    # client's timeout and the harness server's SQLite busy timeout; the cause is unknown.)
    report = wait_for_annotations(fast(project=str(p.id), min_new=3, timeout_s=300))
    worker.join()
    assert report.reached and report.new == 3 and report.counter == "num_tasks_with_annotations"
    assert report.waited_s < 300 and report.polls >= 2


def test_counts_annotations_since_the_last_dataset_version(prefect_harness, labelstudio, project, s3):
    """The baseline is what the dataset's latest manifest recorded for the project."""
    from sftflow.tasks.versions.manifest import Manifest

    p, ids = project
    for i in ids[:2]:
        annotate(labelstudio, i)
        annotate(labelstudio, i, "second opinion")
    root = "datasets/d"
    manifest = Manifest(dataset="d", version="v1", root=root, created_at="2026-01-01T00:00:00",
                        files=[], rows={"train": 0, "eval": 0},
                        source={"project_id": p.id, "num_tasks_with_annotations": 2,
                                "total_annotations_number": 3})
    s3.put_bytes(f"{root}/versions/v1/manifest.json", manifest.to_json())
    s3.put_bytes(f"{root}/refs/latest", b"v1")
    params = {"project": p.title, "dataset": "d", "bucket": s3.bucket, "timeout_s": 1}
    tasks_report = wait_for_annotations(fast(min_new=1, **params))
    assert (tasks_report.reached, tasks_report.baseline, tasks_report.new) == (False, 2, 0)
    assert tasks_report.baseline_version == "v1"
    ann_report = wait_for_annotations(fast(min_new=1, count="annotations", **params))
    assert (ann_report.reached, ann_report.current, ann_report.new) == (True, 4, 1)


def test_a_deleted_project_is_an_error_naming_it(prefect_harness, labelstudio, project):
    p, _ = project
    labelstudio.projects.delete(id=p.id)
    with pytest.raises(ConfigError, match=str(p.id)):
        wait_for_annotations(fast(project=str(p.id), min_new=1, timeout_s=2))


def test_label_studio_down_retries_until_the_deadline(prefect_harness, monkeypatch):
    from sftflow.core.settings import get_settings

    monkeypatch.setenv("SFTFLOW_LABELSTUDIO__URL", "http://127.0.0.1:9")
    get_settings.cache_clear()
    try:
        state = wait_for_annotations(fast(project="anything", min_new=1, timeout_s=6),
                                     return_state=True)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    report = state.result()
    assert state.name == "NotEnough" and report.failed_polls == report.polls >= 2
    assert "Label Studio unreachable" in report.message
