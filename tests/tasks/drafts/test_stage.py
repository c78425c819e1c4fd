"""The drafting stage on a real Label Studio project, with drafts from the OpenAI contract
server's chat endpoint (CONTRACT TEST: the real API is unreachable from here), through the
fault proxy where failures are the subject."""

# ruff: noqa: F811  (pytest fixtures imported from tests.tasks._drafts are test arguments)
from __future__ import annotations

from urllib.parse import urlparse

import pytest

from sftflow.tasks.adapters.labelstudio import build_labelstudio
from sftflow.tasks.drafts.generators import OpenAIChatGenerator
from sftflow.tasks.drafts.stage import draft_open_tasks, draft_result, write_draft
from sftflow.tasks.runtime.polling import Backoff
from tests.contract.openai_server import OpenAIContractServer
from tests.faults.proxy import Fault, FaultProxy
from tests.tasks._drafts import predictions, sft_project, texts  # noqa: F401

pytestmark = pytest.mark.integration

KEY = "sk-contract-test"
JOB = "ft-0123456789abcdef0123"
PROMPTS = [f"Question number {i}: what is {i} plus {i}?" for i in range(8)]


@pytest.fixture()
def chat():
    """(proxy, generator): drafts from the contract server, through the fault proxy."""
    with OpenAIContractServer(api_key=KEY) as server:
        up = urlparse(server.base_url)
        with FaultProxy(up.hostname, up.port) as proxy:
            gen = OpenAIChatGenerator(f"{proxy.url}/v1", "gpt-4o-mini-2024-07-18", KEY,
                                      model_version=JOB, attempts=2, timeout_s=5.0,
                                      retry_delay_s=(0.01, 0.02), concurrency=1)
            yield proxy, gen
            gen.close()


def test_contract_one_draft_per_open_task_and_a_rerun_writes_nothing(labelstudio, sft_project, chat):
    _, gen = chat
    project = sft_project(PROMPTS, annotate=2, skip=1)
    other = max(project.open)  # another model's draft does not make a task drafted
    labelstudio.predictions.create(task=other, result=draft_result("old"), model_version="ft-old")

    report = draft_open_tasks(labelstudio, project.id, gen, generator_kind="openai",
                              page_size=3, batch_size=2)
    assert (report.tasks_seen, report.drafted, report.failed) == (8, 6, {})
    assert report.skipped == {"annotated": 2}
    got = predictions(labelstudio, project.id)
    assert got == {**{(t, JOB): 1 for t in project.open}, (other, "ft-old"): 1}
    by_id = {v: k for k, v in project.tasks.items()}
    assert texts(labelstudio, project.id, JOB) == {t: f"Draft: {by_id[t]}" for t in project.open}

    again = draft_open_tasks(labelstudio, project.id, gen, generator_kind="openai", page_size=3)
    assert (again.drafted, again.failed) == (0, {})
    assert again.skipped == {"annotated": 2, "already_drafted": 6}
    assert predictions(labelstudio, project.id) == got


def test_contract_failing_endpoint_counts_failures_and_a_rerun_drafts_them(labelstudio, sft_project, chat):
    proxy, gen = chat
    project = sft_project(PROMPTS[:6], annotate=1)
    # the first task's two attempts get 500, the next task's two the connection reset
    proxy.add(Fault("status", method="POST", path="/chat/completions", status=500, times=2))
    proxy.add(Fault("reset", method="POST", path="/chat/completions", times=2))

    report = draft_open_tasks(labelstudio, project.id, gen, generator_kind="openai", batch_size=4)
    assert (report.drafted, report.skipped) == (3, {"annotated": 1})
    assert report.failed == {"http 500": 1, "connection": 1}
    failed = {f.task_id for f in report.failures}
    assert len(failed) == 2 and all(f.message for f in report.failures)
    assert set(predictions(labelstudio, project.id)) == {(t, JOB) for t in project.open - failed}

    again = draft_open_tasks(labelstudio, project.id, gen, generator_kind="openai")
    assert (again.drafted, again.failed, again.skipped) == (2, {}, {"annotated": 1, "already_drafted": 3})
    assert predictions(labelstudio, project.id) == {(t, JOB): 1 for t in project.open}


def test_contract_max_tasks_defers_the_rest_to_the_next_run(labelstudio, sft_project, chat):
    _, gen = chat
    project = sft_project(PROMPTS[:5])
    first = draft_open_tasks(labelstudio, project.id, gen, generator_kind="openai", max_tasks=3)
    assert (first.drafted, first.deferred) == (3, 2)
    second = draft_open_tasks(labelstudio, project.id, gen, generator_kind="openai", max_tasks=3)
    assert (second.drafted, second.deferred, second.skipped) == (2, 0, {"already_drafted": 3})


def test_a_lost_answer_to_the_write_never_makes_a_second_draft(settings, labelstudio, sft_project):
    """Label Studio behind the fault proxy: the create succeeds, its answer is lost (504)."""
    project = sft_project(PROMPTS[:1])
    task = next(iter(project.open))
    up = urlparse(settings.labelstudio.url)
    with FaultProxy(up.hostname, up.port) as proxy:
        ls = build_labelstudio(settings.labelstudio.model_copy(update={"url": proxy.url}))
        proxy.add(Fault("lose_response", method="POST", path=r"^/api/predictions", status=504))
        assert write_draft(ls, task, "Hello.", JOB, backoff=Backoff(0.05, 0.1)) is True
        assert proxy.applied["lose_response"] == 1
        assert write_draft(ls, task, "Hello again.", JOB) is False  # already there
    assert predictions(labelstudio, project.id) == {(task, JOB): 1}
    assert texts(labelstudio, project.id, JOB) == {task: "Hello."}
