"""The rescan of a project whose task count disagrees with the ledger (issue #18, item 9),
against the real Label Studio and SeaweedFS: it removes duplicate tasks, and never one that
holds work (an annotation, a skip, a model draft as a prediction, an annotator's draft), nor
one that gains such work between the check and the delete."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from sftflow.tasks.adapters.labelstudio import build_labelstudio
from sftflow.tasks.ingest.importer import ProjectImporter
from sftflow.tasks.ingest.imports import iter_project_tasks, send_tasks
from sftflow.tasks.ingest.ledger import Ledger
from sftflow.tasks.ingest.prompts import prompt_id
from sftflow.tasks.runtime.polling import Backoff, wait_until
from tests.tasks._datasets import textarea

pytestmark = pytest.mark.integration


def put(client, project_id: int, text: str, batch: str | None) -> int:
    """One task holding ``text`` (``batch=None``: a task made by other means, no ingest data)."""
    data = ({"prompt": text, "prompt_id": prompt_id(text), "ingest_batch": batch} if batch
            else {"prompt": text})
    before = {t for t, _ in iter_project_tasks(client, project_id)}
    if batch:
        send_tasks(client, project_id, [data])
    else:
        client.projects.import_tasks(id=project_id, request=[{"data": data}])
    (new,) = {t for t, _ in iter_project_tasks(client, project_id)} - before
    return new


def annotate(client, task_id: int) -> None:
    client.annotations.create(id=task_id, result=[textarea(["an answer"])], was_cancelled=False)


def give_work(client, task_id: int, kind: str) -> None:
    if kind == "annotation":
        annotate(client, task_id)
    elif kind == "skip":
        client.annotations.create(id=task_id, result=[], was_cancelled=True)
    elif kind == "prediction":  # a model draft (tasks.drafts writes them as predictions)
        client.predictions.create(task=task_id, result=[textarea(["a draft"])],
                                  model_version="m1")
    elif kind == "draft":  # an annotator's unsubmitted work, saved by the labeling UI
        resp = client._client_wrapper.httpx_client.request(
            f"api/tasks/{task_id}/drafts", method="POST",
            json={"result": [textarea(["typing..."])], "lead_time": 1.0})
        assert resp.status_code == 201, resp.text


def tasks_left(client, project_id: int) -> dict[int, str]:
    return {t: d["prompt"] for t, d in iter_project_tasks(client, project_id)}


def importer_for(client, s3, project) -> ProjectImporter:
    """An importer whose ledger is empty: the project's tasks make its count disagree, so
    ``open`` rescans the project (its scan is a Prefect task: the tests use the harness)."""
    ledger = Ledger(s3, s3.bucket, "_sftflow", project.id)
    return ProjectImporter(client, ledger, state_prefix="_sftflow", batch_size=10)


def test_the_rescan_never_removes_work_and_keeps_the_worked_on_task_of_a_pair(
        prefect_harness, s3, labelstudio, project):
    """Each prompt twice: a first task, then an ingest copy (same normalised prompt). Where one
    of the two holds work, that one stays and the other goes; where neither does, the first
    stays; a task made by other means is never removed; where both hold work both stay."""
    ls, pid = labelstudio, project.id
    cases = {  # prompt: (work on the first task, work on the copy, which stays)
        "alpha": (None, "annotation", "copy"),
        "beta": (None, "prediction", "copy"),
        "gamma": (None, "draft", "copy"),
        "delta": (None, "skip", "copy"),
        "epsilon": (None, None, "first"),
        "zeta": ("annotation", None, "first"),
        "eta": ("prediction", "annotation", "both"),
    }
    stays: set[int] = set()
    for text, (on_first, on_copy, which) in cases.items():
        first = put(ls, pid, text, "b1")
        copy = put(ls, pid, text.upper() + "  ", "b2")  # the same prompt_id
        for task, work in ((first, on_first), (copy, on_copy)):
            if work:
                give_work(ls, task, work)
        stays |= {"first": {first}, "copy": {copy}, "both": {first, copy}}[which]
    foreign = put(ls, pid, "theta", None)  # made by other means: never removed
    copy_of_foreign = put(ls, pid, "Theta", "b2")
    give_work(ls, copy_of_foreign, "prediction")
    stays |= {foreign, copy_of_foreign}

    importer = importer_for(ls, s3, project)
    importer.open(str(project.created_at))

    left = tasks_left(ls, pid)
    assert set(left) == stays, {t: left.get(t) for t in set(left) ^ stays}
    assert importer.totals.duplicates_removed == 6 and importer.totals.full_scans == 1
    assert importer.known == {prompt_id(t) for t in [*cases, "theta"]}
    assert importer.expected == len(stays)  # the ledger's snapshot counts what is left


def test_a_copy_that_gains_an_annotation_between_the_check_and_the_delete_is_kept(
        prefect_harness, stack, s3, labelstudio, project):
    """The delete request is held 3 s by a proxy; meanwhile an annotator submits an
    annotation on the very task being deleted. The task and its annotation survive."""
    from urllib.parse import urlparse

    from tests.faults.proxy import Fault, FaultProxy

    ls, pid = labelstudio, project.id
    put(ls, pid, "alpha", "b1")
    copy = put(ls, pid, "ALPHA", "b2")
    up = urlparse(stack.labelstudio.url)
    with FaultProxy(up.hostname, up.port) as proxy:
        # Whatever request removes tasks: one task (DELETE /api/tasks/<id>) or a bulk action.
        proxy.add(Fault("delay", method="DELETE", path=r"/api/tasks/\d+", seconds=3))
        proxy.add(Fault("delay", method="POST", path=r"/api/dm/actions", seconds=3))
        client = build_labelstudio(stack.labelstudio.model_copy(update={"url": proxy.url}))

        def annotator() -> None:  # submits while the delete is held by the proxy
            if wait_until(lambda: proxy.applied["delay"] > 0, timeout_s=60,
                          backoff=Backoff(0.02, 0.1)):
                annotate(ls, copy)

        worker = threading.Thread(target=annotator, daemon=True)
        worker.start()
        importer = importer_for(client, s3, project)
        importer.open(str(project.created_at))
        worker.join(70)
    assert proxy.applied["delay"] == 1
    left = tasks_left(ls, pid)
    assert copy in left, "the task annotated during the rescan's delete was deleted"
    assert len(ls.annotations.list(id=copy)) == 1  # (not the task's counter: 0 on PostgreSQL)
    assert importer.totals.duplicates_removed == 0
    assert Counter(prompt_id(p) for p in left.values()) == {prompt_id("alpha"): 2}
