"""sftflow.demo: what the simulated annotators submit when a task carries model drafts."""

# ruff: noqa: F811  (pytest fixtures imported from tests helpers are test arguments)

from __future__ import annotations

import pytest

from sftflow.demo.run import ACCEPT_ONE_IN, simulated_response
from tests.tasks._drafts import sft_project  # noqa: F401 (a fixture)


def _pred(pid: int, text: str, from_name: str = "instruction") -> dict:
    return {"id": pid, "model_version": f"job-{pid}",
            "result": [{"from_name": from_name, "to_name": "prompt", "type": "textarea",
                        "value": {"text": [text]}}]}


def test_without_a_draft_the_reference_is_written_from_nothing():
    assert simulated_response("p1", "reference", []) == ("reference", None)
    assert simulated_response("p1", "reference", [_pred(5, "x", from_name="other")]) == (
        "reference", None)


def test_the_newest_draft_is_accepted_for_one_prompt_in_three_and_edited_otherwise():
    outcomes = [simulated_response(f"prompt-{i}", f"ref {i}", [_pred(5, "old"), _pred(9, f"d{i}")])
                for i in range(300)]
    assert {parent for _, parent in outcomes} == {9}  # the newest draft, always recorded
    accepted = sum(text.startswith("d") for text, _ in outcomes)
    assert accepted / len(outcomes) == pytest.approx(1 / ACCEPT_ONE_IN, abs=0.08)
    assert outcomes == [simulated_response(f"prompt-{i}", f"ref {i}",
                                           [_pred(5, "old"), _pred(9, f"d{i}")])
                        for i in range(300)]  # reruns decide the same


@pytest.mark.integration
def test_listed_tasks_give_the_predictions_it_needs(labelstudio, sft_project):
    """Label Studio's task listing (what the simulation reads) carries each draft whole."""
    from sftflow.tasks.drafts.stage import draft_result

    project = sft_project(["Question?"])
    task_id = next(iter(project.tasks.values()))
    pred = labelstudio.predictions.create(task=task_id, result=draft_result("a draft"),
                                          model_version="job-1")
    task = next(iter(labelstudio.tasks.list(project=project.id, fields="all")))
    text, parent = simulated_response("Question?", "reference", list(task.predictions or []))
    assert parent == pred.id and text in ("a draft", "reference")
