"""The records of fine-tuning, without services: the lineage record's constructor and its JSON,
the training result, the report built from a record."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sftflow import __version__
from sftflow.core.hashing import config_hash
from sftflow.tasks.finetune import lineage
from sftflow.tasks.finetune.backends import Baseline, Hyperparameters, JobSpec
from sftflow.tasks.finetune.dataset import TrainingData
from sftflow.tasks.finetune.lineage import LineageRecord
from sftflow.tasks.finetune.trl_job import TrainResult, model_uri, result_uri

DATA = TrainingData(dataset="qa", version="v1", manifest_uri="s3://b/datasets/qa/versions/v1/manifest.json",
                    manifest_sha256="a" * 64, rows={"train": 32, "eval": 8}, files=[], columns=None)
CONFIG = lineage.job_config("trl", "/models/tiny", "lora", Hyperparameters(max_steps=8))

#: The keys of a new record, in the order the flow wrote them before the record had a type.
NEW_RECORD_KEYS = [
    "job", "status", "dataset", "version", "dataset_manifest", "dataset_manifest_sha256", "base_model",
    "method", "hyperparameters", "config", "config_hash", "backend", "backend_job_id", "claim", "baseline",
    "preflight", "submitted_at", "finished_at", "metrics", "artifacts", "fine_tuned_model", "error",
    "eval_gate", "lineage_uri", "run_id", "code_version", "history",
]


def _submitted(**kw) -> LineageRecord:
    return LineageRecord.submitted(job="ft-1", data=DATA, config=CONFIG, preflight={"base_model": "local"},
                                   lineage_uri="s3://b/models/ft-1/manifest.json", run_id="run-1",
                                   at="2026-01-01T00:00:00+00:00", **{"baseline": None, **kw})


def test_a_new_record_has_the_same_keys_and_values_as_before():
    rec = _submitted().to_dict()
    assert list(rec) == NEW_RECORD_KEYS
    assert rec["status"] == "submitted" and rec["backend"] == "trl" and rec["method"] == "lora"
    assert rec["dataset_manifest"] == DATA.manifest_uri and rec["dataset_manifest_sha256"] == "a" * 64
    assert rec["hyperparameters"] == CONFIG["hyperparameters"] and rec["hyperparameters"]["max_steps"] == 8
    assert rec["config"] == CONFIG and rec["config_hash"] == config_hash(CONFIG, length=64)
    assert len(rec["config_hash"]) == 64 and rec["code_version"] == __version__
    assert rec["history"] == [{"at": "2026-01-01T00:00:00+00:00", "event": "submitted"}]
    assert rec["submitted_at"] == "2026-01-01T00:00:00+00:00" and rec["run_id"] == "run-1"
    for empty in ("backend_job_id", "baseline", "finished_at", "fine_tuned_model", "error", "eval_gate"):
        assert rec[empty] is None
    assert rec["metrics"] == {} and rec["artifacts"] == {}
    # the claim to submit the job (issue 10, item 11): this run's, for claim_ttl_s (900 s)
    assert rec["claim"] == {"run_id": "run-1", "expires_at": "2026-01-01T00:15:00Z"}


def test_the_baseline_is_recorded_and_the_record_round_trips():
    base = Baseline(job="ft-0", model_uri="s3://b/models/ft-0/model", base_model="/models/tiny", method="lora")
    rec = _submitted(baseline=base)
    assert rec.baseline == {"job": "ft-0", "model_uri": "s3://b/models/ft-0/model",
                            "base_model": "/models/tiny", "method": "lora"}
    stored = {**rec.to_dict(), "updated_at": "t", "dataset_tag": "trained-ft-1", "from_a_newer_writer": 1}
    again = LineageRecord.model_validate(stored)
    assert again.to_dict() == stored and not again.terminal
    assert LineageRecord.model_validate({**stored, "status": "failed"}).terminal


def test_a_record_read_back_is_validated():
    with pytest.raises(ValidationError):
        LineageRecord.model_validate({**_submitted().to_dict(), "status": "exploded"})
    with pytest.raises(ValidationError):
        LineageRecord.model_validate({"job": "ft-1", "status": "submitted"})


def test_event_payload_and_summary():
    rec = LineageRecord.model_validate({**_submitted().to_dict(), "status": "failed", "error": "boom",
                                        "metrics": {"eval_loss": 1.5}})
    assert rec.event_payload() == {"job": "ft-1", "dataset": "qa", "version": "v1", "backend": "trl",
                                   "status": "failed", "error": "boom"}
    md = rec.summary_markdown()
    assert md.startswith("# Fine-tune ft-1: failed") and "- error: boom" in md and "| eval_loss | 1.5 |" in md


def test_train_result_keeps_the_keys_of_each_outcome():
    spec = JobSpec(job="ft-1", dataset="qa", version="v1", base_model="m", train_files=[], eval_files=[],
                   output_uri="s3://b/models/ft-1/")
    assert result_uri(spec) == "s3://b/models/ft-1/result.json" and model_uri(spec) == "s3://b/models/ft-1/model"
    failed = TrainResult.failed(spec, "t0", RuntimeError("out of memory"))
    assert set(failed.model_dump(exclude_none=True)) == {"job", "status", "started_at", "finished_at", "error"}
    assert failed.error == "RuntimeError: out of memory"
    ok = TrainResult.succeeded(spec, "t0", {"metrics": {"steps": 8}, "history": []}, ["a", "b"])
    assert set(ok.model_dump(exclude_none=True)) == {"job", "status", "started_at", "finished_at", "metrics",
                                                     "history", "artifacts"}
    assert ok.artifacts == {"model": "s3://b/models/ft-1/model", "kind": "adapter", "files": "2",
                            "result": "s3://b/models/ft-1/result.json"}


def test_no_credential_of_a_tracking_uri_is_kept_in_the_record_or_its_summary():
    """A record whose MLflow run names its tracking URI with a password or a token (as an older
    writer stored it, or a tracker reported it) keeps the URI without them, in its JSON and its
    summary; the rest of the URI stays."""
    secret = "pw-7c1d9e"
    tracking = {"tracking_uri": f"https://ml:{secret}@mlflow.example:5000/?token={secret}&x=1",
                "experiment_id": "3", "run_id": "r1"}
    rec = LineageRecord.model_validate({**_submitted().to_dict(), "tracking": tracking})
    assert rec.tracking["tracking_uri"] == "https://mlflow.example:5000/?x=1"
    assert secret not in lineage._dump(rec).decode() and secret not in rec.summary_markdown()
    assert rec.tracking["run_id"] == "r1"
