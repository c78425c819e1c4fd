"""The token stream of a TRL job, on the tiny model's real tokenizer (no services, no Prefect):
what the loss covers per row, rows that would train on nothing, templates that lack what the
loss needs, the batch fingerprint, and a training refused before its first step."""

# ruff: noqa: F811  (pytest fixtures imported from tests.tasks._finetune are test arguments)
from __future__ import annotations

import shutil

import pytest

from sftflow.core import failpoints
from sftflow.core.errors import SftflowError
from sftflow.tasks.finetune import tokens
from sftflow.tasks.finetune.backends import Hyperparameters, JobSpec
from sftflow.tasks.finetune.tiny_model import CHAT_TEMPLATE
from sftflow.tasks.finetune.training import prepare_examples, train_messages
from tests.tasks._finetune import tiny_chat_model, tiny_model  # noqa: F401

#: A template that renders every turn but the assistant's: the completion renders to nothing
#: after the prompt, so the completion-only loss masks every token of every row.
DROPS_ASSISTANT = (
    "{% for m in messages %}{% if m['role'] != 'assistant' %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
#: The tiny template without its {% generation %} markers (as most stock templates are).
NO_MARKERS = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def _rows(n: int = 6) -> list[list[dict[str, str]]]:
    return [[{"role": "system", "content": "Answer in one sentence."},
             {"role": "user", "content": f"Prompt {i}: explain item {i}" + " in a sentence" * (i % 3) + "."},
             {"role": "assistant", "content": f"Item {i} is explained" + " here" * i + "."}] for i in range(n)]


def _tok(path, template: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if template is not None:
        tok.chat_template = template
    return tok


def _examples(tok, rows, hp=None):
    return prepare_examples({"train": rows}, tok, hp or Hyperparameters(max_length=64))


def test_the_loss_covers_the_assistant_turn_of_every_row_and_coverage_counts_it(tiny_chat_model):
    tok = _tok(tiny_chat_model)
    rows = _rows()
    _, examples, _ = _examples(tok, rows)
    stream = tokens.tokenize_rows(tok, examples["train"])
    trained = []
    for (ids, labels), row in zip(stream, rows, strict=True):
        start = next(i for i, x in enumerate(labels) if x != -100)
        assert labels[:start] == [-100] * start and labels[start:] == ids[start:]
        assert tok.decode(ids[start:]) == row[2]["content"] + "<|end|>"
        trained.append(len(ids) - start)
    cov = tokens.coverage(stream, 64, dropped=2)
    assert cov.rows == 6 and cov.rows_zero_trained == 0 and cov.zero_trained_rows == []
    assert cov.trained_tokens_min == min(trained) and cov.trained_tokens_total == sum(trained)
    assert cov.trained_tokens_median == sorted(trained)[2] / 2 + sorted(trained)[3] / 2
    assert cov.tokens_total == sum(len(ids) for ids, _ in stream)
    assert (cov.rows_truncated, cov.tokens_truncated, cov.rows_dropped_over_max_length) == (0, 0, 2)
    tokens.refuse_untrained(cov)  # nothing to refuse
    # the assistant-only loss (generation markers) covers the same tokens in this template
    assert tokens.tokenize_rows(tok, examples["train"], "assistant") == stream

    # truncation at the trainer's max_length is counted row by row
    longest = max(len(ids) for ids, _ in stream)
    cut = tokens.coverage(stream, longest - 2, truncate_at=longest - 2)
    over = [len(ids) - (longest - 2) for ids, _ in stream if len(ids) > longest - 2]
    assert cut.rows_truncated == len(over) >= 1 and cut.tokens_truncated == sum(over)


def test_a_template_that_renders_no_completion_trains_on_zero_tokens_and_is_refused(tiny_chat_model):
    tok = _tok(tiny_chat_model, DROPS_ASSISTANT)
    _, examples, _ = _examples(tok, _rows())
    stream = tokens.tokenize_rows(tok, examples["train"])
    assert all(set(labels) == {-100} for _, labels in stream)
    cov = tokens.coverage(stream, 64, row_numbers=[0, 1, 2, 4, 5, 7])  # as numbered before drops
    assert cov.rows_zero_trained == 6 and cov.trained_tokens_min == 0 and cov.trained_tokens_median == 0
    assert cov.zero_trained_rows == [0, 1, 2, 4, 5, 7]
    with pytest.raises(SftflowError, match=r"6 of 6 train rows would train on zero tokens .*: "
                                           r"train rows 0, 1, 2, 4, 5, 7\. .*not starting the training"):
        tokens.refuse_untrained(cov)


def test_the_assistant_only_loss_needs_generation_markers_in_the_template(tiny_chat_model, tiny_model):
    tokens.check_template(_tok(tiny_chat_model), "chat", "assistant")  # markers: fine
    for template in (NO_MARKERS, DROPS_ASSISTANT):
        tokens.check_template(_tok(tiny_chat_model, template), "chat", "completion")  # no markers needed
        with pytest.raises(SftflowError, match=r"has no \{% generation %\} markers: the assistant-only "
                                               r"loss \(loss=assistant\) masks by them"):
            tokens.check_template(_tok(tiny_chat_model, template), "chat", "assistant")
    with pytest.raises(SftflowError, match="loss=assistant needs a chat template"):
        tokens.check_template(_tok(tiny_model), "prompt_completion", "assistant")
    assert tokens.has_generation_markers("{%- generation -%}x{% endgeneration %}")
    assert not tokens.has_generation_markers(NO_MARKERS) and not tokens.has_generation_markers(None)
    # without markers the template's assistant mask is empty: every row would train on nothing
    tok = _tok(tiny_chat_model, NO_MARKERS)
    _, examples, _ = _examples(tok, _rows(2))
    masked = tokens.tokenize_rows(tok, examples["train"], "assistant")
    assert tokens.coverage(masked, 64).rows_zero_trained == 2


def test_the_batch_fingerprint_is_stable_across_runs_and_moves_with_the_stream(tiny_chat_model):
    def fingerprint(template=None, seed=42, rows=None):
        tok = _tok(tiny_chat_model, template)
        _, examples, _ = _examples(tok, rows or _rows(11))
        return tokens.batch_hashes(tokens.tokenize_rows(tok, examples["train"]), 4, seed)

    first = fingerprint()
    assert len(first) == tokens.BATCHES_HASHED == 4 and len(set(first)) == 4
    assert fingerprint() == first  # a second load and tokenisation: identical
    # 11 rows in batches of 4: 3 batches an epoch, the 4th is the next epoch's first (seed + 1)
    order = tokens.batch_order(11, 4, 42)
    assert [len(b) for b in order] == [4, 4, 3, 4]
    assert sorted(i for batch in order[:3] for i in batch) == list(range(11))
    assert tokens.batch_order(11, 4, 42) == order and tokens.batch_order(11, 4, 43) != order
    assert tokens.first_difference(first, fingerprint(seed=7)) is not None
    edited = _rows(11)
    edited[order[2][0]][2]["content"] = "A different answer."
    assert tokens.first_difference(first, fingerprint(rows=edited)) == 2  # the batch holding it
    assert tokens.first_difference(first, fingerprint(NO_MARKERS)) is None  # same tokens rendered
    assert tokens.first_difference(first, first[:3]) == 3 and tokens.first_difference(first, first) is None


def test_the_tokenizer_and_template_hashes_and_library_versions(tiny_chat_model, tiny_model):
    chat, plain = _tok(tiny_chat_model), _tok(tiny_model)
    assert tokens.tokenizer_sha256(chat) == tokens.tokenizer_sha256(_tok(tiny_chat_model))
    assert tokens.tokenizer_sha256(chat) != tokens.tokenizer_sha256(plain)
    assert tokens.template_sha256(plain) is None
    assert tokens.template_sha256(chat) == tokens.template_sha256(_tok(tiny_chat_model))
    assert tokens.template_sha256(chat) != tokens.template_sha256(_tok(tiny_chat_model, NO_MARKERS))
    versions = tokens.library_versions()
    assert {"trl", "transformers", "torch", "peft"} <= set(versions)
    rows = tokens.tokenize_rows(chat, _examples(chat, _rows())[1]["train"])
    record = tokens.token_record(chat, rows, name=str(tiny_chat_model), fmt="chat", loss="completion",
                                 seed=42, batch_size=4, cov=tokens.coverage(rows, 64))
    assert record.tokenizer_sha256 == tokens.tokenizer_sha256(chat) and record.versions == versions
    assert record.batches == tokens.batch_hashes(rows, 4, 42) and len(record.batches_sha256) == 64


@pytest.mark.train
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_zero_mask_template_is_refused_before_the_first_training_step(tiny_chat_model, tmp_path):
    base = tmp_path / "zero-mask-model"
    shutil.copytree(tiny_chat_model, base)
    _tok(base, DROPS_ASSISTANT).save_pretrained(base)
    spec = JobSpec(job="ft-zero-mask", dataset="qa", version="v1", base_model=str(base), method="full",
                   hyperparameters=Hyperparameters(max_steps=2, batch_size=2, max_length=64),
                   train_files=[], eval_files=[], output_uri="s3://unused/ft-zero-mask")
    # a training step that starts raises FailpointError: the refusal must come before it
    with failpoints.active({"finetune.train-step": "raise"}), \
            pytest.raises(SftflowError, match=r"6 of 6 train rows would train on zero tokens"):
        train_messages(None, spec, {"train": _rows()}, tmp_path / "work")
