"""sftflow.demo: what the simulated annotators submit when a task carries model drafts."""

# ruff: noqa: F811  (pytest fixtures imported from tests helpers are test arguments)

from __future__ import annotations

import json

import pytest

from sftflow.demo.run import ACCEPT_ONE_IN, ROUNDS, sample_round, simulated_response
from sftflow.demo.sample import SAMPLE_PATH
from tests.tasks._drafts import sft_project  # noqa: F401 (a fixture)


def _pred(pid: int, text: str, from_name: str = "instruction") -> dict:
    return {"id": pid, "model_version": f"job-{pid}",
            "result": [{"from_name": from_name, "to_name": "prompt", "type": "textarea",
                        "value": {"text": [text]}}]}


def test_the_sample_splits_into_rounds_that_each_can_train_a_model():
    """Every row lands in exactly one round; round 1 alone has enough answers for the
    fine-tune gate (10 train rows), and round 2 has open prompts for model 1 to draft."""
    rows = [json.loads(line) for line in SAMPLE_PATH.read_text(encoding="utf-8").splitlines()]
    by_round = {r: [row for i, row in enumerate(rows) if sample_round(i) == r] for r in ROUNDS}
    assert sum(map(len, by_round.values())) == len(rows)
    valid = {r: [x for x in rs if isinstance(x.get("prompt"), str) and x["prompt"].strip()
                 and x.get("response", "").strip()] for r, rs in by_round.items()}
    assert len(valid[1]) >= 60 and len(valid[2]) >= 40
    # Both rounds carry a deliberately bad row (quarantined at ingest or filtered at build).
    assert all(len(valid[r]) < len(by_round[r]) for r in ROUNDS)


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
