"""The eval gate with three numbers (issue #20): a fine-tune is promoted only when its eval loss
beats both the dataset's previous best and the base model prompted with k train examples
(few-shot). Pure decisions, no services."""

from __future__ import annotations

import pytest

from sftflow.tasks.finetune.gate import eval_gate

FEW = {"k": 3, "seed": 0, "eval_loss": 2.2, "examples": [4, 9, 17]}


def test_a_first_model_must_beat_the_few_shot_base():
    best = eval_gate({"eval_loss": 2.0}, None, FEW)
    assert best["promote"] and best["decision"] == "best"
    assert (best["eval_loss"], best["baseline_eval_loss"], best["few_shot_eval_loss"]) == (2.0, None, 2.2)
    assert best["beats_few_shot"] and best["few_shot_delta"] == pytest.approx(-0.2) and best["few_shot_k"] == 3
    assert "first model of this dataset" in best["reason"] and "2.0000 < 2.2000" in best["reason"]

    lost = eval_gate({"eval_loss": 2.3}, None, FEW)
    assert not lost["promote"] and lost["decision"] == "not better" and not lost["beats_few_shot"]
    assert "2.3000 >= 2.2000 of the base model with 3 examples in its prompt" in lost["reason"]


def test_beating_the_previous_best_is_not_enough_when_few_shot_wins():
    m = {"eval_loss": 2.3, "baseline_eval_loss": 2.5}
    gate = eval_gate(m, "ft-old", FEW)
    assert not gate["promote"] and gate["decision"] == "not better"
    assert gate["beats_baseline"] and not gate["beats_few_shot"]
    assert (gate["eval_loss"], gate["baseline_eval_loss"], gate["few_shot_eval_loss"]) == (2.3, 2.5, 2.2)
    assert "2.3000 < 2.5000 of ft-old" in gate["reason"] and "2.3000 >= 2.2000" in gate["reason"]

    both = eval_gate({"eval_loss": 2.1, "baseline_eval_loss": 2.5}, "ft-old", FEW)
    assert both["promote"] and both["decision"] == "best" and both["delta"] == pytest.approx(-0.4)
    neither = eval_gate({"eval_loss": 2.6, "baseline_eval_loss": 2.5}, "ft-old", FEW)
    assert not neither["promote"] and not neither["beats_baseline"] and not neither["beats_few_shot"]
    worse_than_best = eval_gate({"eval_loss": 2.1, "baseline_eval_loss": 2.0}, "ft-old", FEW)
    assert not worse_than_best["promote"] and worse_than_best["beats_few_shot"]


def test_a_few_shot_baseline_that_was_asked_for_and_not_evaluated_promotes_nothing():
    skipped = {"k": 3, "seed": 0, "eval_loss": None, "skipped": "the 3-shot prompt of eval row 2 is 700 "
               "tokens, the model's context 512"}
    gate = eval_gate({"eval_loss": 2.0}, None, skipped)
    assert gate["decision"] == "skipped" and not gate["promote"]
    assert gate["reason"] == f"few-shot baseline not evaluated: {skipped['skipped']}"
    assert gate["eval_loss"] == 2.0 and gate["few_shot_eval_loss"] is None


def test_without_a_few_shot_baseline_the_gate_compares_with_the_previous_best_only():
    """k = 0 (off), or a backend that has none: the decision of the gate before #20."""
    assert eval_gate({"eval_loss": 2.0}, None)["decision"] == "best"
    assert eval_gate({"eval_loss": 2.0, "baseline_eval_loss": 2.5}, "ft-old")["promote"]
    assert not eval_gate({"eval_loss": 2.6, "baseline_eval_loss": 2.5}, "ft-old")["promote"]
    assert eval_gate({}, "ft-old", FEW)["decision"] == "skipped"
