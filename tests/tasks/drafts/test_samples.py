"""Sample outputs after training: eval prompts from chat rows, one column per model, a model
that cannot load or a prompt that fails shown in its cell; the tiny model answers on CPU."""

# ruff: noqa: F811  (pytest fixtures imported from tests.tasks._finetune are test arguments)
from __future__ import annotations

import pytest

from sftflow.tasks.drafts.samples import EvalPrompt, compare_outputs, eval_prompts
from tests.tasks._finetune import tiny_chat_model  # noqa: F401

ROWS = [{"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": f"question {i}"},
                      {"role": "assistant", "content": f"answer {i}"}]} for i in range(5)]


class _Echo:
    model_version = "echo"

    def __init__(self, system_prompt):
        self.system_prompt = system_prompt

    def generate(self, prompts):
        return [ValueError("no answer") if p.endswith("1") else f"{self.system_prompt} {p}" for p in prompts]


def test_eval_prompts_are_the_first_rows_with_system_prompt_and_reference():
    prompts = eval_prompts(ROWS + [{"messages": [{"role": "assistant", "content": "x"}]}], n=3)
    assert [p.prompt for p in prompts] == ["question 0", "question 1", "question 2"]
    assert {p.system_prompt for p in prompts} == {"Be brief."} and prompts[2].reference == "answer 2"


def test_each_model_is_a_column_and_failures_stay_in_their_cell():
    loads: list[str | None] = []

    def echo(system_prompt):
        loads.append(system_prompt)
        return _Echo(system_prompt)

    rows = compare_outputs(eval_prompts(ROWS, 3), {"new (ft-b)": echo, "previous (ft-a)": OSError("gone")})
    assert [r["new (ft-b)"] for r in rows] == [
        "Be brief. question 0", "(error: ValueError: no answer)", "Be brief. question 2"]
    assert all(r["previous (ft-a)"] == "(error: OSError: gone)" for r in rows)
    assert rows[0]["reference"] == "answer 0" and loads == ["Be brief."]  # loaded once per system prompt


@pytest.mark.train
def test_the_tiny_model_answers_the_eval_prompts_on_cpu(tiny_chat_model):
    from sftflow.tasks.drafts.samples import _factory

    prompts = [EvalPrompt(prompt="Explain the sea.", system_prompt="Be brief."),
               EvalPrompt(prompt="List primes.", system_prompt="Be brief.")]
    rows = compare_outputs(prompts, {"new": _factory(tiny_chat_model, None, "tiny", 8)})
    # an untrained model may stop at once: "(empty answer)", but no error
    assert len(rows) == 2 and all(r["new"] and not r["new"].startswith("(error") for r in rows)
