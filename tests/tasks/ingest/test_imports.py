"""Project bootstrap and exactly-once bulk import against the real Label Studio (integration),
and the pure parts: config check, retry classification."""

from __future__ import annotations

from collections import Counter

import pytest

from sftflow.core.errors import ConfigError
from sftflow.tasks.adapters.labelstudio import build_labelstudio
from sftflow.tasks.ingest.importer import remove_duplicates
from sftflow.tasks.ingest.imports import (
    ImportOutcomeUnknown,
    import_batch,
    iter_project_tasks,
    scan_project,
    send_tasks,
    task_count,
)
from sftflow.tasks.ingest.projects import SFT_LABEL_CONFIG, config_problems, ensure_project
from sftflow.tasks.ingest.prompts import prompt_id
from sftflow.tasks.runtime.polling import is_transient
from tests.conftest import unique


def tasks_for(texts: list[str], batch: str) -> list[dict]:
    return [{"prompt": t, "prompt_id": prompt_id(t), "ingest_batch": batch} for t in texts]


def prompt_ids_in(client, project_id: int) -> Counter:
    return Counter(d["prompt_id"] for _, d in iter_project_tasks(client, project_id))


def test_config_check():
    assert config_problems(SFT_LABEL_CONFIG) == []
    bad = '<View><Text name="text" value="$text"/><Choices name="c" toName="text"/></View>'
    assert config_problems(bad) == ['no <Text name="prompt">', 'no <TextArea name="instruction">']
    assert "not valid XML" in config_problems("<View>")[0]


@pytest.mark.integration
def test_ensure_project_creates_once_and_refuses_incompatible(labelstudio):
    title = unique("t")
    first = ensure_project(labelstudio, title)
    try:
        assert config_problems(first.label_config) == []
        assert 'maxSubmissions="1"' in first.label_config
        assert ensure_project(labelstudio, title).id == first.id
        assert ensure_project(labelstudio, str(first.id)).id == first.id
    finally:
        labelstudio.projects.delete(id=first.id)

    other = labelstudio.projects.create(
        title=unique("t"),
        label_config='<View><Text name="text" value="$text"/>'
        '<Choices name="c" toName="text"><Choice value="a"/></Choices></View>',
    )
    try:
        with pytest.raises(ConfigError, match="incompatible labeling config"):
            ensure_project(labelstudio, other.title)
        assert labelstudio.projects.get(id=other.id).label_config.count("Choices") == 2  # untouched
    finally:
        labelstudio.projects.delete(id=other.id)
    with pytest.raises(ConfigError, match="does not exist"):
        ensure_project(labelstudio, unique("t"), create=False)


@pytest.mark.integration
def test_refused_tasks_are_isolated_by_bisection(labelstudio, project):
    good = tasks_for([f"question {i}" for i in range(9)], "b1")
    bad = {"prompt_id": "no-prompt-key", "ingest_batch": "b1"}  # the config needs $prompt
    sent = send_tasks(labelstudio, project.id, good[:4] + [bad] + good[4:])
    landed, refused, requests = sent.landed, sent.refused, sent.requests
    assert len(landed) == 9 and [t for t, _ in refused] == [bad]
    assert refused[0][1].startswith("rejected_by_labelstudio: 400")
    assert requests > 1 and task_count(labelstudio, project.id) == 9
    # Each landed task's id comes back with the import's answer, split requests included: no
    # listing of the project is needed to name it (ingest's near-duplicate records do).
    there = {d["prompt_id"]: tid for tid, d in iter_project_tasks(labelstudio, project.id)}
    assert sent.task_ids == there


@pytest.mark.integration
def test_a_batch_result_names_the_task_of_each_prompt_it_landed(labelstudio, project):
    batch = tasks_for([f"task id question {i}" for i in range(25)], "b-ids")
    result = import_batch(labelstudio, project.id, "b-ids", batch)
    there = {d["prompt_id"]: tid for tid, d in iter_project_tasks(labelstudio, project.id)}
    assert result.task_ids == there and sorted(result.landed) == sorted(there)


@pytest.mark.integration
def test_unknown_outcome_is_awaited_then_reconciled_without_duplicates(labelstudio, project, settings):
    batch = tasks_for([f"prompt number {i} " * 20 for i in range(3000)], "b-timeout")
    # A real timeout: the server goes on importing after the client stopped waiting, and shows
    # nothing until its transaction commits.
    with pytest.raises(ImportOutcomeUnknown, match="Timeout") as doubt:
        send_tasks(labelstudio, project.id, batch, timeout_s=0.05)
    assert len(doubt.value.in_doubt) == 3000 and doubt.value.landed == []
    retry = import_batch(labelstudio, project.id, "b-timeout", batch, reconcile_first=True,
                            doubt_s=120)
    ids = prompt_ids_in(labelstudio, project.id)
    assert len(ids) == 3000 and set(ids.values()) == {1}  # each prompt exactly once
    assert sorted(retry.landed) == sorted(t["prompt_id"] for t in batch)
    assert (retry.reconciled, retry.requests) == (3000, 0)  # it landed whole: nothing resent

    # Nothing listening: the outcome is certain (nothing landed) and the retry sends it all.
    dead = build_labelstudio(settings.labelstudio.model_copy(update={"url": "http://127.0.0.1:9"}))
    more = tasks_for([f"later prompt {i}" for i in range(50)], "b-refused")
    with pytest.raises(ImportOutcomeUnknown, match="ConnectError"):
        send_tasks(dead, project.id, more)
    retry = import_batch(labelstudio, project.id, "b-refused", more, reconcile_first=True,
                            doubt_s=0.1)
    assert (retry.reconciled, len(retry.landed)) == (0, 50)
    assert task_count(labelstudio, project.id) == 3050


@pytest.fixture()
def proxied(stack):
    """A Label Studio client whose requests pass through a FaultProxy to the real server."""
    from urllib.parse import urlparse

    from tests.faults.proxy import FaultProxy

    up = urlparse(stack.labelstudio.url)
    with FaultProxy(up.hostname, up.port) as proxy:
        yield proxy, build_labelstudio(stack.labelstudio.model_copy(update={"url": proxy.url}))


IMPORT_PATH = r"^/api/projects/\d+/import"


@pytest.mark.integration
def test_a_500_after_the_tasks_were_committed_is_reconciled_not_resent(
    labelstudio, project, proxied
):
    """Issue #18, item 4: Label Studio (or what stands before it) can answer 500 once the
    import has committed. The batch is looked up before anything is sent again."""
    from tests.faults.proxy import Fault

    proxy, client = proxied
    batch = tasks_for([f"committed then 500 {i}" for i in range(40)], "b-500")
    proxy.add(Fault("lose_response", method="POST", path=IMPORT_PATH, status=500))
    result = import_batch(client, project.id, "b-500", batch, doubt_s=30)
    assert proxy.applied["lose_response"] == 1
    ids = prompt_ids_in(labelstudio, project.id)
    assert len(ids) == 40 and set(ids.values()) == {1}  # each prompt exactly once
    assert sorted(result.landed) == sorted(t["prompt_id"] for t in batch)
    assert (result.reconciled, result.requests, result.rejected) == (40, 1, [])

    # A 500 that rolled back (nothing landed) is still bisected to the task that causes it.
    more = tasks_for([f"rolled back {i}" for i in range(7)], "b-poison")
    proxy.add(Fault("status", method="POST", path=IMPORT_PATH, body=rb"rolled back 3",
                    status=500, times=0))
    result = import_batch(client, project.id, "b-poison", more, doubt_s=30)
    assert [t["prompt"] for t, _ in result.rejected] == ["rolled back 3"]
    assert len(result.landed) == 6 and result.reconciled == 0
    assert task_count(labelstudio, project.id) == 46


@pytest.mark.integration
def test_scan_finds_ids_of_foreign_tasks_and_removes_unannotated_duplicates(labelstudio, project):
    send_tasks(labelstudio, project.id, tasks_for(["alpha", "beta"], "b1"))
    labelstudio.projects.import_tasks(id=project.id, request=[{"data": {"prompt": "Gamma "}}])
    send_tasks(labelstudio, project.id, tasks_for(["Alpha"], "b2"))  # same normalised prompt
    scan = scan_project(labelstudio, project.id, prompt_id)
    assert scan.ids == {prompt_id("alpha"), prompt_id("beta"), prompt_id("gamma")}
    assert (scan.task_number, scan.without_id, len(scan.duplicates)) == (4, 1, 1)
    assert remove_duplicates(labelstudio, project.id, list(scan.groups.values())) == scan.duplicates
    assert task_count(labelstudio, project.id) == 3


def test_unknown_outcomes_are_retried_config_errors_are_not():
    assert is_transient(ImportOutcomeUnknown("ReadTimeout"))
    assert not is_transient(ConfigError("incompatible labeling config"))
