"""The TRL options of the trl backend on the tiny model (no services, no Prefect): packing with
TRL's best-fit decreasing strategy, the completion-only and assistant-only losses with and
without packing (the labels the model is trained on), gradient checkpointing and precision,
each recorded in the job's metrics and training record."""

# ruff: noqa: F811  (pytest fixtures imported from tests.tasks._finetune are test arguments)
from __future__ import annotations

import itertools
import math

import pytest

from sftflow.core.errors import ConfigError
from sftflow.tasks.finetune import lineage, tokens, trl_config
from sftflow.tasks.finetune.backends import Hyperparameters, JobSpec
from sftflow.tasks.finetune.reproduce import compare
from sftflow.tasks.finetune.tiny_model import CHAT_TEMPLATE
from sftflow.tasks.finetune.training import (
    build_trainer,
    load_tokenizer,
    prepare_examples,
    token_stream,
    train_messages,
)
from tests.tasks._finetune import tiny_chat_model  # noqa: F401

#: The tiny template with the assistant's ``<|end|>`` outside the generation markers: the
#: assistant-only loss then leaves it out, the completion-only loss trains on it.
END_OUTSIDE = CHAT_TEMPLATE.replace("<|end|>{% endgeneration %}", "{% endgeneration %}<|end|>")
assert END_OUTSIDE != CHAT_TEMPLATE


def _rows(n: int = 12) -> list[list[dict[str, str]]]:
    return [[{"role": "system", "content": "Answer in one sentence."},
             {"role": "user", "content": f"Prompt {i}: explain item {i}" + " in a sentence" * (i % 3) + "."},
             {"role": "assistant", "content": f"Item {i} is explained" + " here" * (i % 4) + "."}]
            for i in range(n)]


def _spec(base, job: str = "ft-options", method: str = "full", **hp) -> JobSpec:
    hp = {"max_steps": 3, "batch_size": 2, "max_length": 128, "learning_rate": 1e-3, **hp}
    return JobSpec(job=job, dataset="qa", version="v1", base_model=str(base), method=method,
                   hyperparameters=Hyperparameters(**hp), train_files=[], eval_files=[],
                   output_uri=f"s3://unused/{job}")


# -- pure ---------------------------------------------------------------------------------------
def test_the_new_options_are_part_of_the_job_config_only_when_they_are_not_the_default():
    defaults = Hyperparameters(max_steps=8, packing=False, gradient_checkpointing=False, precision="auto")
    dumped = defaults.model_dump(mode="json")
    assert not {"packing", "gradient_checkpointing", "precision"} & set(dumped)
    cfg = lineage.job_config("trl", "/models/tiny", "lora", defaults)
    assert lineage.job_name("0" * 64, cfg) == "ft-1c0bf4fb840c9426ced1"  # as before the fields
    names = set()
    for change in ({"packing": True}, {"gradient_checkpointing": True}, {"precision": "bf16"},
                   {"precision": "fp32"}):
        hp = Hyperparameters(max_steps=8, **change)
        cfg = lineage.job_config("trl", "/models/tiny", "lora", hp)
        assert {k: cfg["hyperparameters"][k] for k in change} == change
        names.add(lineage.job_name("0" * 64, cfg))
        assert Hyperparameters.model_validate(cfg["hyperparameters"]) == hp
    assert len(names) == 4 and "ft-1c0bf4fb840c9426ced1" not in names


def test_precision_auto_is_bf16_only_on_cuda_with_bf16_and_bf16_is_refused_where_cuda_lacks_it():
    assert trl_config.resolve_precision("auto", cuda=False, cuda_bf16=False) == "fp32"
    assert trl_config.resolve_precision("auto", cuda=True, cuda_bf16=False) == "fp32"
    assert trl_config.resolve_precision("auto", cuda=True, cuda_bf16=True) == "bf16"
    assert trl_config.resolve_precision("fp32", cuda=True, cuda_bf16=True) == "fp32"
    assert trl_config.resolve_precision("bf16", cuda=False, cuda_bf16=False) == "bf16"  # CPU autocast
    assert trl_config.resolve_precision("bf16", cuda=True, cuda_bf16=True) == "bf16"
    with pytest.raises(ConfigError, match=r"precision=bf16: this CUDA device does not support bf16"):
        trl_config.resolve_precision("bf16", cuda=True, cuda_bf16=False)
    assert trl_config.resolve_precision("auto") == "fp32"  # this machine: CPU only


# -- the labels the model is trained on, per loss, packed or not ---------------------------------
def _trained_segments(batch) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` of each row in a collated batch: a padding-free batch (packing)
    is one flat sequence cut where ``position_ids`` restart; a padded one is cut by its mask."""
    if "position_ids" in batch:
        ids, labels, pos = (batch[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        return [(ids[a:b], labels[a:b]) for a, b in itertools.pairwise(starts)]
    out = []
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                 batch["attention_mask"].tolist(), strict=True):
        n = sum(mask)
        out.append((ids[:n], labels[:n]))
    return out


@pytest.mark.train
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("loss", ["completion", "assistant"])
def test_every_prompt_token_is_masked_and_the_loss_covers_what_it_names(tiny_chat_model, tmp_path,
                                                                         loss, packing):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(tiny_chat_model))
    tok.chat_template = END_OUTSIDE
    rows = _rows()
    hp = Hyperparameters(max_steps=1, batch_size=len(rows), max_length=128, loss=loss, packing=packing)
    _, examples, _ = prepare_examples({"train": rows}, tok, hp)
    trainer = build_trainer(AutoModelForCausalLM.from_pretrained(tiny_chat_model), tok, hp,
                            examples["train"], None, tmp_path / "trainer")
    prepared = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert (len(prepared) < len(rows)) if packing else (len(prepared) == len(rows))
    segments = _trained_segments(trainer.data_collator(prepared))
    assert len(segments) == len(rows)
    by_ids = {tuple(tok.apply_chat_template(r, tokenize=True, return_dict=True)["input_ids"]): r for r in rows}
    seen = set()
    for ids, labels in segments:
        row = by_ids[tuple(ids)]  # each trained row is one whole source row, never cut
        seen.add(row[1]["content"])
        n_prompt = len(tok.apply_chat_template(row[:2], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"])
        assert labels[:n_prompt] == [-100] * n_prompt  # system, user, the assistant header
        trained = [t for t in labels if t != -100]
        answer = row[2]["content"] + ("<|end|>" if loss == "completion" else "")
        assert tok.decode(trained) == answer
        assert trained == ids[n_prompt:n_prompt + len(trained)]
    assert len(seen) == len(rows)


# -- packing: the run, its record and its reproduction -------------------------------------------
@pytest.mark.train
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_packed_run_trains_fewer_sequences_than_rows_and_its_record_is_reproduced(tiny_chat_model,
                                                                                    tmp_path):
    rows = _rows()
    spec = _spec(tiny_chat_model, method="lora", packing=True)
    out = train_messages(None, spec, {"train": rows}, tmp_path / "work")
    m, record = out["metrics"], tokens.TokenRecord.model_validate(out["training_record"])
    assert m["packing"] is True and m["train_rows"] == len(rows) == record.coverage.rows
    assert record.packing == "bfd" and m["training_sequences"] == record.packed_rows < len(rows)
    assert record.batches_observed is True  # the trainer drew the predicted packed batches
    assert m["steps"] == 3 and all(math.isfinite(h["loss"]) for h in out["history"])
    assert record.coverage.rows_zero_trained == 0

    # `sftflow models reproduce` re-tokenises as the training did: the packed stream again
    tok = load_tokenizer(str(tiny_chat_model))
    fmt, examples, check = prepare_examples({"train": rows}, tok, spec.hyperparameters)
    _, again = token_stream(tok, fmt, {"train": rows}, examples, check, spec, refuse=False)
    verdict = compare(spec.job, "qa", "v1", record, again)
    assert verdict.identical and verdict.differences == []
    # the same rows unpacked: same rows, other batches, and the verdict says why
    unpacked = spec.model_copy(update={"hyperparameters": spec.hyperparameters.model_copy(
        update={"packing": False})})
    _, flat = token_stream(tok, fmt, {"train": rows}, examples, check, unpacked, refuse=False)
    verdict = compare(spec.job, "qa", "v1", record, flat)
    assert verdict.rows_identical and not verdict.identical and verdict.first_differing_batch == 0
    assert "packing: recorded bfd, now None" in verdict.differences


# -- gradient checkpointing and precision ---------------------------------------------------------
@pytest.mark.train
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_losses_and_the_model_reported_it_on(tiny_chat_model,
                                                                                  tmp_path, method):
    runs = {}
    for on in (False, True):
        spec = _spec(tiny_chat_model, method=method, gradient_checkpointing=on)
        runs[on] = train_messages(None, spec, {"train": _rows(8)}, tmp_path / f"gc-{on}")
    assert runs[False]["metrics"]["gradient_checkpointing"] is False
    assert runs[True]["metrics"]["gradient_checkpointing"] is True  # as the model reported it
    losses = {on: [h["loss"] for h in run["history"]] for on, run in runs.items()}
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], rel=1e-4)


@pytest.mark.train
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_precision_used_is_recorded_auto_is_fp32_on_cpu_and_bf16_trains_on_cpu(tiny_chat_model,
                                                                                   tmp_path):
    auto = train_messages(None, _spec(tiny_chat_model), {"train": _rows(8)}, tmp_path / "auto")
    assert auto["metrics"]["precision"] == "fp32"  # the dtype the model computed in
    bf16 = train_messages(None, _spec(tiny_chat_model, precision="bf16"), {"train": _rows(8)},
                          tmp_path / "bf16")
    assert bf16["metrics"]["precision"] == "bf16" and bf16["metrics"]["steps"] == 3
    assert all(math.isfinite(h["loss"]) for h in bf16["history"])
    # bf16 autocast rounds: close to the fp32 losses, not equal
    a, b = ([h["loss"] for h in run["history"]] for run in (auto, bf16))
    assert a != b and b == pytest.approx(a, rel=1e-2)
