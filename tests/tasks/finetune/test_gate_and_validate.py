"""Pure logic of fine-tuning: chat JSONL validation, gates, eval gate, job names (no services)."""

from __future__ import annotations

import json

import pytest

from sftflow.core.errors import SftflowError
from sftflow.tasks.finetune import gate, lineage
from sftflow.tasks.finetune.backends import Hyperparameters
from sftflow.tasks.finetune.dataset import DataFile, TrainingData
from sftflow.tasks.finetune.validate import validate_chat_lines
from sftflow.tasks.versions import formats


def _chat(user: str = "Hi?", assistant: str = "Hello.", **extra) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user},
                                    {"role": "assistant", "content": assistant}], **extra})


def test_chat_validation_counts_each_problem():
    lines = [_chat() for _ in range(10)] + [
        "not json",
        json.dumps({"messages": []}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}),
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),
        json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}),
        _chat(assistant="word " * 400),
        "",
    ]
    report = validate_chat_lines(lines, max_tokens_per_example=300)
    assert report.examples == 17 and report.valid == 10
    assert dict(report.errors) == {
        "not valid JSON": 1, "no messages list": 1, "unknown role 'robot'": 1,
        "assistant content is not a string": 1, "empty assistant content": 1,
        "last message is not from the assistant": 1, "over 300 tokens": 1,
    }
    assert report.samples[0] == {"line": 11, "reason": "not valid JSON"}
    assert report.max_example_tokens == 1 + 4 + 500 + 4  # "Hi?" (3 bytes) and 2,000 bytes


def test_chat_validation_needs_ten_examples_and_accepts_the_formats_output():
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(9)]
    lines = formats.openai_chat_jsonl(rows, system_prompt="Be brief.").decode().splitlines()
    report = validate_chat_lines(lines)
    assert report.valid == 9 and dict(report.errors) == {"fewer than 10 valid examples": 1}
    assert validate_chat_lines(lines, min_examples=9).ok


def _version(rows: dict[str, int], files: list[tuple[str, str]], schema=None) -> TrainingData:
    return TrainingData(
        dataset="qa", version="v1", manifest_uri="s3://b/datasets/qa/versions/v1/manifest.json",
        manifest_sha256="0" * 64, rows=rows,
        files=[DataFile(split=split, format=fmt, uri=f"s3://b/{split}.{fmt}") for split, fmt in files],
        columns=sorted(formats.schema_json() if schema is None else schema) or None,
    )


FILES = [("train", "parquet"), ("eval", "parquet"), ("train", "openai_chat")]


def test_version_gates_pass_and_fail_with_figures():
    checks = gate.version_gates(_version({"train": 36, "eval": 4}, FILES), backend="openai",
                                min_train_rows=10, min_eval_rows=1)
    assert all(c["ok"] for c in checks) and len(checks) == 6
    gate.require_gates(checks, "qa@v1")

    small = _version({"train": 5, "eval": 0}, [("train", "parquet")])
    checks = gate.version_gates(small, backend="trl", min_train_rows=10, min_eval_rows=1)
    assert [c["check"] for c in checks if not c["ok"]] == ["train rows", "eval split rows", "eval parquet"]
    with pytest.raises(SftflowError, match=r"qa@v2 fails the fine-tune gates: train rows is 5 \(need >= 10\)"):
        gate.require_gates(checks, "qa@v2")

    no_cols = _version({"train": 36, "eval": 4}, FILES, schema={"text": "string"})
    bad = [c for c in gate.version_gates(no_cols, backend="trl", min_train_rows=1, min_eval_rows=1) if not c["ok"]]
    assert bad[0]["check"] == "prompt/completion columns" and bad[0]["value"] == ""


def test_training_data_builds_the_job_spec_from_its_files():
    data = _version({"train": 36, "eval": 4}, FILES + [("train", "parquet")])
    spec = data.job_spec(job="ft-x", base_model="m", method="full", hyperparameters=Hyperparameters(),
                         output_uri="s3://b/models/ft-x")
    assert spec.train_files == ["s3://b/train.parquet"] * 2 and spec.eval_files == ["s3://b/eval.parquet"]
    assert spec.chat_train_files == ["s3://b/train.openai_chat"] and spec.chat_eval_files == []
    assert (spec.dataset, spec.version, spec.method) == ("qa", "v1", "full")


def test_eval_gate_decisions():
    assert gate.eval_gate({"eval_loss": 2.0}, None)["decision"] == "best"
    better = gate.eval_gate({"eval_loss": 2.0, "baseline_eval_loss": 2.5}, "ft-old")
    assert better["promote"] and better["delta"] == pytest.approx(-0.5)
    worse = gate.eval_gate({"eval_loss": 2.6, "baseline_eval_loss": 2.5}, "ft-old")
    assert not worse["promote"] and worse["decision"] == "not better"
    assert gate.eval_gate({}, "ft-old")["decision"] == "skipped"


def test_job_name_depends_on_version_and_normalised_config_only():
    cfg = {"backend": "trl", "base_model": "m", "method": "lora", "hyperparameters": {"seed": 1, "lr": 1e-3}}
    reordered = {"hyperparameters": {"lr": 1e-3, "seed": 1}, "method": "lora", "base_model": "m", "backend": "trl"}
    a = lineage.job_name("a" * 64, cfg)
    assert a == lineage.job_name("a" * 64, reordered) and a.startswith("ft-") and len(a) == 23
    assert a != lineage.job_name("b" * 64, cfg)
    assert a != lineage.job_name("a" * 64, {**cfg, "method": "full"})


def test_job_name_is_unchanged_by_the_move_to_core_hashing():
    """Pinned: the job name the code computed before config_hash moved to sftflow.core.hashing."""
    cfg = lineage.job_config("trl", "/models/tiny", "lora", Hyperparameters(max_steps=8))
    assert lineage.job_name("0" * 64, cfg) == "ft-1c0bf4fb840c9426ced1"
