"""TRL training inputs: chat rows in the tokenizer's format, the loss on the assistant turn only
(real ``SFTTrainer`` labels of the tiny model), the length check before training, the loss
history per step and its PNG."""

# ruff: noqa: F811  (pytest fixtures imported from tests.tasks._finetune are test arguments)
from __future__ import annotations

import struct
import zlib

import pytest

from sftflow.core.errors import SftflowError
from sftflow.tasks.finetune import few_shot, lineage
from sftflow.tasks.finetune.backends import FewShotSpec, Hyperparameters, JobSpec
from sftflow.tasks.finetune.files import read_json
from sftflow.tasks.finetune.gate import eval_gate
from sftflow.tasks.finetune.loss_plot import loss_curve_png, series
from sftflow.tasks.finetune.training import (
    build_trainer,
    check_lengths,
    few_shot_baseline,
    load_tokenizer,
    loss_history,
    prepare_examples,
    split_turns,
    to_example,
    train_messages,
)
from tests.tasks._finetune import tiny_chat_model, tiny_model  # noqa: F401

SYSTEM = {"role": "system", "content": "Answer in one sentence."}


def _messages(prompt: str, completion: str, system: bool = True) -> list[dict[str, str]]:
    return [*([SYSTEM] if system else []), {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion}]


# -- pure --------------------------------------------------------------------------------------
def test_a_chat_row_becomes_a_conversational_or_a_plain_example():
    msgs = _messages("Prompt 1: explain item 1.", "Item 1 is explained.")
    assert to_example(msgs, "chat") == {"prompt": msgs[:2], "completion": [msgs[2]]}
    assert to_example(msgs, "prompt_completion") == {"prompt": "Prompt 1: explain item 1.",
                                                     "completion": "Item 1 is explained."}
    for bad in ([], msgs[:2], [msgs[2], msgs[1]], [SYSTEM, msgs[2]]):
        with pytest.raises(SftflowError, match="must end with an assistant turn after a user turn"):
            split_turns(bad)


def test_rows_over_max_length_are_counted_and_dropped_or_fail_the_run():
    check = check_lengths({"train": [10, 70, 64, 65], "eval": [80, 5]}, 64, "drop")
    assert check.keep == {"train": [0, 2], "eval": [1]}
    assert check.metrics() == {"max_length": 64, "length_policy": "drop", "rows_total": 6,
                               "rows_over_max_length": 3, "max_tokens_seen": 80}
    assert check_lengths({"train": [3, 4]}, 64, "fail").rows_over_max_length == 0
    with pytest.raises(SftflowError, match=r"3 rows \(2 train, 1 eval\) are longer than max_length "
                                           r"64 tokens \(longest 80\); length_policy=fail"):
        check_lengths({"train": [10, 70, 64, 65], "eval": [80, 5]}, 64, "fail")


def test_the_length_policy_is_part_of_the_job_config_only_when_it_is_not_the_default():
    assert "length_policy" not in Hyperparameters(max_steps=8).model_dump(mode="json")
    cfg = lineage.job_config("trl", "/models/tiny", "lora", Hyperparameters(max_steps=8))
    assert lineage.job_name("0" * 64, cfg) == "ft-1c0bf4fb840c9426ced1"  # as before the field
    fail = lineage.job_config("trl", "/models/tiny", "lora",
                              Hyperparameters(max_steps=8, length_policy="fail"))
    assert fail["hyperparameters"]["length_policy"] == "fail"
    assert lineage.job_name("0" * 64, fail) != "ft-1c0bf4fb840c9426ced1"
    assert Hyperparameters.model_validate(fail["hyperparameters"]).length_policy == "fail"


def test_loss_history_has_one_row_per_step_with_train_and_eval_loss():
    logged = [
        {"loss": 3.0, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": 0.5, "step": 1},
        {"loss": 2.5, "grad_norm": 0.9, "learning_rate": 5e-4, "epoch": 1.0, "step": 2},
        {"eval_loss": 2.7, "eval_runtime": 0.1, "epoch": 1.0, "step": 2},
        {"eval_loss": 2.7, "eval_runtime": 0.1, "epoch": 1.0, "step": 2},  # the final evaluate()
        {"train_runtime": 1.0, "train_loss": 2.75, "epoch": 1.0, "step": 2},
    ]
    assert loss_history(logged) == [
        {"loss": 3.0, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": 0.5, "step": 1},
        {"loss": 2.5, "grad_norm": 0.9, "learning_rate": 5e-4, "epoch": 1.0, "step": 2, "eval_loss": 2.7},
    ]


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


def _pixels(png: bytes, width: int) -> list[bytes]:
    """The RGB rows of a PNG written by loss_curve_png (one IDAT, filter 0 on every row)."""
    length = struct.unpack(">I", png[33:37])[0]
    assert png[37:41] == b"IDAT"
    raw = zlib.decompress(png[41:41 + length])
    stride = 1 + 3 * width
    return [raw[r * stride + 1:(r + 1) * stride] for r in range(len(raw) // stride)]


def test_the_loss_curves_are_a_png_with_both_colours():
    history = [{"step": s, "loss": 3.0 / s} for s in range(1, 21)]
    for row in history[4::5]:
        row["eval_loss"] = 3.5 / row["step"]
    png = loss_curve_png(history, width=320, height=200)
    assert _png_size(png) == (320, 200) and png == loss_curve_png(history, width=320, height=200)
    pixels = b"".join(_pixels(png, 320))
    assert bytes((31, 119, 180)) in pixels and bytes((255, 127, 14)) in pixels
    assert series(history, "eval_loss") == [(5.0, 0.7), (10.0, 0.35), (15.0, 3.5 / 15), (20.0, 0.175)]
    assert _png_size(loss_curve_png([])) == (640, 360)  # no history: empty axes, no error


# -- real tokenizer and SFTTrainer of the tiny model -------------------------------------------
def _ids(tok, messages, **kw) -> list[int]:
    return tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]


@pytest.mark.train
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_chat_rows_are_rendered_by_the_template_and_only_the_assistant_turn_is_labelled(tiny_chat_model,
                                                                                          tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    rows = [_messages(f"Prompt {i}: explain item {i} in a sentence.",
                      f"Item {i} is explained here with a sentence of moderate length.") for i in range(6)]
    fmt, examples, check = prepare_examples({"train": rows[:4], "eval": rows[4:]}, tok,
                                            Hyperparameters(max_length=64))
    assert fmt == "chat" and check.rows_over_max_length == 0 and len(examples["eval"]) == 2
    trainer = build_trainer(model, tok, Hyperparameters(max_steps=1), examples["train"],
                            examples["eval"], tmp_path / "trainer")
    for i, row in enumerate(trainer.train_dataset):
        ids, labels = row["input_ids"], row["labels"]
        text = tok.decode(ids)
        assert text == (f"<|system|>Answer in one sentence.<|end|><|user|>{rows[i][1]['content']}"
                        f"<|end|><|assistant|>{rows[i][2]['content']}<|end|>")
        n_prompt = len(_ids(tok, rows[i][:2], add_generation_prompt=True))
        assert labels[:n_prompt] == [-100] * n_prompt  # system, user and the assistant header
        assert labels[n_prompt:] == ids[n_prompt:]  # the answer and its <|end|>
        assert tok.decode(ids[n_prompt:]) == rows[i][2]["content"] + "<|end|>"
        assert len(ids) <= check.max_tokens_seen <= 64


@pytest.mark.train
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_tokenizer_without_chat_template_trains_on_plain_prompt_and_completion(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = tiny_model
    tok = AutoTokenizer.from_pretrained(plain)
    assert not tok.chat_template
    rows = [_messages("Write a short poem about the sea.", "The sea is wide.")] * 2
    fmt, examples, _ = prepare_examples({"train": rows}, tok, Hyperparameters(max_length=64))
    assert fmt == "prompt_completion" and "eval" not in examples
    trainer = build_trainer(AutoModelForCausalLM.from_pretrained(plain), tok,
                            Hyperparameters(max_steps=1), examples["train"], None, tmp_path / "t")
    row = trainer.train_dataset[0]
    n_prompt = len(tok("Write a short poem about the sea.")["input_ids"])
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert tok.decode(row["input_ids"][n_prompt:]) == "The sea is wide.</s>"
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]


@pytest.mark.train
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_long_rows_are_measured_with_the_base_tokenizer_and_dropped_never_truncated(tiny_chat_model,
                                                                                     tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    short = [_messages(f"Prompt {i}: explain item {i}.", f"Item {i} is explained.") for i in range(6)]
    long = [_messages(f"Prompt {i}: " + "explain the item in a sentence " * 12, "Fine.") for i in range(3)]
    hp = Hyperparameters(max_length=48, max_steps=1)
    _, examples, check = prepare_examples({"train": short[:4] + long[:2], "eval": short[4:] + long[2:]},
                                            tok, hp)
    lengths = [len(_ids(tok, m)) for m in short + long]
    assert max(lengths[:6]) <= 48 < min(lengths[6:])
    assert check.metrics() == {"max_length": 48, "length_policy": "drop", "rows_total": 9,
                               "rows_over_max_length": 3, "max_tokens_seen": max(lengths)}
    assert check.keep == {"train": [0, 1, 2, 3], "eval": [0, 1]}
    trainer = build_trainer(AutoModelForCausalLM.from_pretrained(tiny_chat_model), tok, hp,
                            examples["train"], examples["eval"], tmp_path / "trainer")
    assert trainer.args.max_length is None  # TRL cuts nothing: what is left already fits
    kept = [len(r["input_ids"]) for r in trainer.train_dataset] + [len(r["input_ids"]) for r in trainer.eval_dataset]
    assert sorted(kept) == sorted(lengths[:6]) and max(kept) <= 48

    with pytest.raises(SftflowError, match="3 rows .* are longer than max_length 48 tokens"):
        prepare_examples({"train": short + long}, tok, hp.model_copy(update={"length_policy": "fail"}))
    with pytest.raises(SftflowError, match="no train row fits in max_length 48 tokens"):
        prepare_examples({"train": long}, tok, hp)


@pytest.mark.train
@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_gate_refuses_a_fine_tune_that_the_few_shot_base_beats(tiny_chat_model, s3, tmp_path):
    """One training step at a learning rate that wrecks the tiny model: the base model given two
    train rows in its prompt has the lower loss on the eval completions, so the first model of
    the dataset is not promoted. The few-shot loss is cached per (base model, version, k, seed)."""
    rows = [_messages(f"Prompt {i}: explain item {i} in a sentence.",
                      f"Item {i} is explained here with a sentence of moderate length.") for i in range(16)]
    messages = {"train": rows[:12], "eval": rows[12:]}
    hp = Hyperparameters(max_steps=1, batch_size=4, learning_rate=1.0, max_length=64)
    cache = s3.uri("models/_few_shot/qa-v1.json")
    spec = JobSpec(job="ft-wrecked", dataset="qa", version="v1", base_model=str(tiny_chat_model),
                   method="full", hyperparameters=hp, train_files=[], eval_files=[],
                   output_uri=s3.uri("models/ft-wrecked"), few_shot=FewShotSpec(k=2, seed=7, cache_uri=cache))
    out = train_messages(s3, spec, messages, tmp_path)

    shots = out["few_shot"]
    assert (shots["k"], shots["seed"], shots["eval_rows"], shots["cached"]) == (2, 7, 4, False)
    assert shots["examples"] == few_shot.choose_examples(rows[:12], list(range(12)), 2, 7)
    assert (shots["base_model"], shots["dataset"], shots["version"]) == (str(tiny_chat_model), "qa", "v1")
    m = out["metrics"]
    assert m["steps"] == 1 and m["few_shot_eval_loss"] == shots["eval_loss"] > 0
    assert m["eval_loss"] > shots["eval_loss"]
    gate = eval_gate(m, None, shots)
    assert gate["decision"] == "not better" and not gate["promote"] and not gate["beats_few_shot"]
    assert "of the base model with 2 examples in its prompt" in gate["reason"]

    # computed once per (base model, version, k, seed): the next job reads it, no model needed
    assert read_json(s3, cache)["eval_loss"] == shots["eval_loss"]
    tok = load_tokenizer(str(tiny_chat_model))
    fmt, _, check = prepare_examples(messages, tok, hp)
    again = few_shot_baseline(s3, spec.model_copy(update={"job": "ft-other"}), None, tok, fmt, messages,
                              check, tmp_path)
    assert again.cached and again.eval_loss == shots["eval_loss"] and again.examples == shots["examples"]
