"""``TransformersGenerator`` with a real (tiny, untrained: its drafts are gibberish) Llama
model built on the spot: greedy and repeatable, a too-long prompt fails alone, and a
tokenizer's chat template carries the training system prompt."""

# ruff: noqa: F811  (pytest fixtures imported from tests.tasks._finetune are test arguments)
from __future__ import annotations

import shutil

import pytest

from sftflow.tasks.drafts.generators import DraftError, TransformersGenerator, failure_reason
from tests.tasks._finetune import tiny_model  # noqa: F401

pytestmark = [pytest.mark.train, pytest.mark.filterwarnings("ignore::FutureWarning")]

PROMPTS = ["Prompt 3: explain item 3 in a sentence.", "Prompt 8: explain item 8 in a sentence."]


def test_the_tiny_model_drafts_greedily_and_a_too_long_prompt_fails_alone(tiny_model):
    gen = TransformersGenerator(tiny_model, model_version="ft-tiny", max_new_tokens=12)
    first = gen.generate([PROMPTS[0], "item " * 600, PROMPTS[1]])
    assert isinstance(first[0], str) and first[0] and isinstance(first[2], str) and first[2]
    assert isinstance(first[1], DraftError) and failure_reason(first[1]) == "prompt_too_long"
    assert gen.generate(PROMPTS) == [first[0], first[2]]  # greedy: the same drafts again


def test_new_tokens_are_capped_to_the_context_and_only_a_prompt_leaving_no_room_fails(
        tiny_model):
    """The settings' default (512 new tokens) never fits the tiny model's 512-token context
    with a prompt: drafts are cut to what fits instead of failing every prompt."""
    gen = TransformersGenerator(tiny_model, model_version="ft-tiny", max_new_tokens=512)
    assert gen.context == 512
    short, full = gen.generate([PROMPTS[0], "item " * 600])
    assert isinstance(short, str) and short
    assert isinstance(full, DraftError) and failure_reason(full) == "prompt_too_long"
    assert "no room" in str(full)


def test_a_chat_template_carries_the_system_prompt(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    model_dir = shutil.copytree(tiny_model, tmp_path / "chat-model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save_pretrained(model_dir)
    gen = TransformersGenerator(model_dir, model_version="ft-chat", system_prompt="Be brief.",
                                max_new_tokens=8)
    seen = gen.tokenizer.decode(gen._input_ids(PROMPTS[0])[0])
    assert seen == f"<system>Be brief.\n<user>{PROMPTS[0]}\n<assistant>"
    assert isinstance(gen.generate([PROMPTS[0]])[0], str)
