"""Pure logic of drafting, without services: which tasks are open, the prediction's shape, the
messages a model sees, failure reasons and the report's arithmetic."""

from __future__ import annotations

import json

import httpx
import pytest

from sftflow.core.errors import ConfigError
from sftflow.tasks.drafts.generators import (
    DraftError,
    DraftGenerator,
    HttpStatusError,
    OpenAIChatGenerator,
    chat_messages,
    failure_reason,
)
from sftflow.tasks.drafts.model import resolve_model
from sftflow.tasks.drafts.stage import (
    MAX_FAILURE_SAMPLES,
    BatchOutcome,
    DraftFailure,
    DraftReport,
    OpenTask,
    classify,
    draft_result,
)
from sftflow.tasks.versions import formats


def _task(id_=1, prompt="Say hi.", annotations=(), predictions=()):
    return {"id": id_, "data": {"prompt": prompt}, "annotations": list(annotations),
            "predictions": list(predictions)}


def test_open_tasks_are_those_without_annotation_or_draft_of_this_model():
    assert classify(_task(), "ft-a") == OpenTask(1, "Say hi.")
    assert classify(_task(annotations=[{"was_cancelled": False}]), "ft-a") == "annotated"
    # a skip (cancelled annotation) leaves the task open
    assert classify(_task(annotations=[{"was_cancelled": True}]), "ft-a") == OpenTask(1, "Say hi.")
    assert classify(_task(predictions=[{"model_version": "ft-a"}]), "ft-a") == "already_drafted"
    # another model's draft does not count
    assert classify(_task(predictions=[{"model_version": "ft-b"}]), "ft-a") == OpenTask(1, "Say hi.")
    assert classify(_task(prompt="  "), "ft-a") == "no_prompt"
    assert classify({"id": 2, "data": {}, "annotations": [], "predictions": []}, "ft-a") == "no_prompt"


def test_a_draft_is_a_prediction_on_the_sft_textarea():
    assert draft_result("Hello.") == [{"from_name": "instruction", "to_name": "prompt",
                                       "type": "textarea", "value": {"text": ["Hello."]}}]


@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_drafts_see_the_prompt_side_of_the_openai_training_rows(system):
    row = {"prompt": "What is 2+2?", "completion": "4"}
    trained = json.loads(formats.openai_chat_jsonl([row], system))["messages"]
    assert chat_messages("What is 2+2?", system) == trained[:-1]
    assert chat_messages("What is 2+2?", system)[-1] == {"role": "user", "content": "What is 2+2?"}


def test_failure_reasons():
    assert failure_reason(DraftError("prompt_too_long", "x")) == "prompt_too_long"
    assert failure_reason(HttpStatusError(503, "x")) == "http 503"
    assert failure_reason(httpx.ReadTimeout("x")) == "timeout"
    assert failure_reason(httpx.RemoteProtocolError("x")) == "connection"
    assert failure_reason(RuntimeError("x")) == "RuntimeError"


def test_the_report_counts_every_task_once_and_keeps_the_first_failures():
    report = DraftReport(project_id=7, model_version="ft-a", generator="openai")
    report.skip("annotated", 2)
    failures = [DraftFailure(task_id=i, reason="http 500", message="boom")
                for i in range(MAX_FAILURE_SAMPLES + 5)]
    report.add(BatchOutcome(drafted=3, skipped={"already_drafted": 1}, failures=failures))
    report.add(BatchOutcome(failures=[DraftFailure(task_id=99, reason="timeout", message="slow")]))
    assert (report.drafted, report.skipped_total, report.failed_total) == (3, 3, MAX_FAILURE_SAMPLES + 6)
    assert report.failed == {"http 500": MAX_FAILURE_SAMPLES + 5, "timeout": 1}
    assert len(report.failures) == MAX_FAILURE_SAMPLES
    assert report.table() == [
        {"outcome": "drafted", "reason": "", "tasks": 3},
        {"outcome": "skipped", "reason": "already_drafted", "tasks": 1},
        {"outcome": "skipped", "reason": "annotated", "tasks": 2},
        {"outcome": "failed", "reason": "http 500", "tasks": MAX_FAILURE_SAMPLES + 5},
        {"outcome": "failed", "reason": "timeout", "tasks": 1},
    ]
    assert report.event_payload()["failed"] == report.failed


def test_the_model_is_named_exactly_once_before_any_io():
    for kw in ({}, {"job": "ft-a", "dataset": "sft"}, {"location": "/m"}):
        with pytest.raises(ConfigError):
            resolve_model(None, "models", "datasets", **kw)  # type: ignore[arg-type]
    model = resolve_model(None, "models", "datasets", location="/m", model_version="m-1")  # type: ignore[arg-type]
    assert (model.model_version, model.location, model.best) == ("m-1", "/m", None)


def test_the_chat_generator_needs_a_model_name_and_is_a_draft_generator():
    with pytest.raises(ConfigError, match="SFTFLOW_DRAFTS__MODEL"):
        OpenAIChatGenerator("http://127.0.0.1:9/v1", None, None, model_version="ft-a")
    gen = OpenAIChatGenerator("http://127.0.0.1:9/v1", "m", None, model_version="ft-a")
    assert isinstance(gen, DraftGenerator)
    assert gen.generate([]) == []
    gen.close()
