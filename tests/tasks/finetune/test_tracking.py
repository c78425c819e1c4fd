"""MLflow tracking of a fine-tune job, logged to a real MLflow file store (``file:`` URI in
tmp_path) and read back with the MLflow client: params, loss per step, the dataset version as
the run's input, the lineage link; one run per job; off without a tracking URI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftflow.core.settings import Settings
from sftflow.tasks.finetune.lineage import LineageRecord
from sftflow.tasks.finetune.tracking import (
    MlflowTracker,
    metric_history,
    run_params,
    step_metrics,
    track_job,
)

MANIFEST = "s3://bucket-x/datasets/qa/versions/v-0001/manifest.json"
HISTORY = [
    {"step": 1, "epoch": 0.5, "loss": 2.5, "learning_rate": 5e-3, "grad_norm": 1.25},
    {"step": 2, "epoch": 1.0, "loss": 2.0, "eval_loss": 2.2, "learning_rate": 4e-3},
    {"step": 3, "epoch": 1.5, "loss": 1.5, "learning_rate": 3e-3},
    {"step": 4, "epoch": 2.0, "loss": 1.25, "eval_loss": 1.9, "learning_rate": 2e-3},
]


def _record(job: str = "ft-abc", status: str = "succeeded", **kw) -> LineageRecord:
    return LineageRecord(
        job=job, status=status, dataset="qa", version="v-0001", dataset_manifest=MANIFEST,
        dataset_manifest_sha256="ab" * 32, base_model="/models/tiny", method="lora",
        hyperparameters={"max_steps": 4, "learning_rate": 5e-3, "batch_size": 4}, config_hash="c" * 64,
        backend="trl", backend_job_id="local:x", lineage_uri=f"s3://bucket-x/models/{job}/manifest.json",
        metrics={"eval_loss": 1.8, "steps": 4, "train_rows": 32, "format": "chat"},
        eval_gate={"decision": "best"}, **{"loss_history": HISTORY, **kw})


def _settings(uri: str) -> Settings:
    return Settings(mlflow={"tracking_uri": uri, "experiment": "sftflow-test"})


@pytest.fixture()
def store(tmp_path) -> str:
    return (tmp_path / "mlruns").as_uri()  # file:///.../mlruns


def test_step_metrics_take_every_numeric_field_of_each_step():
    rows = step_metrics(HISTORY + [{"epoch": 3.0, "loss": 9.0}, {"step": 5, "note": "x", "ok": True}])
    assert ("loss", 2.5, 1) in rows and ("eval_loss", 1.9, 4) in rows and ("grad_norm", 1.25, 1) in rows
    assert len(rows) == 4 + 4 + 3 + 4  # no row without a step, no text, no boolean
    assert run_params(_record())["hp.max_steps"] == "4"


def test_tracking_is_off_without_a_tracking_uri():
    assert MlflowTracker.from_settings(Settings()) is None
    assert track_job(Settings(), _record()) is None


def test_a_job_is_logged_as_one_run_and_read_back(store):
    from mlflow import MlflowClient

    tracked = track_job(_settings(store), _record())
    assert tracked is not None and "error" not in tracked and not tracked["reused"]

    client = MlflowClient(tracking_uri=store)
    run = client.get_run(tracked["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "ft-abc"
    assert client.get_experiment(tracked["experiment_id"]).name == "sftflow-test"
    # params: the job's identity and every hyperparameter
    p = run.data.params
    assert p["dataset"] == "qa" and p["version"] == "v-0001" and p["base_model"] == "/models/tiny"
    assert p["hp.learning_rate"] == "0.005" and p["hp.batch_size"] == "4" and p["method"] == "lora"
    # metrics per step, then the final figures at the last step
    assert metric_history(client, run.info.run_id, "loss") == [(1, 2.5), (2, 2.0), (3, 1.5), (4, 1.25)]
    assert metric_history(client, run.info.run_id, "eval_loss") == [(2, 2.2), (4, 1.8), (4, 1.9)]
    assert run.data.metrics["train_rows"] == 32 and run.data.metrics["steps"] == 4
    # the dataset version is the run's input, its source the version's manifest
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "qa@v-0001" and inp.dataset.digest == "ab" * 16
    assert inp.dataset.source_type == "s3" and json.loads(inp.dataset.source) == {"uri": MANIFEST}
    assert [(t.key, t.value) for t in inp.tags] == [("mlflow.data.context", "train")]
    # the link to the lineage record, and what is not a number
    t = run.data.tags
    assert t["sftflow.lineage_uri"] == "s3://bucket-x/models/ft-abc/manifest.json"
    assert t["sftflow.job"] == "ft-abc" and t["sftflow.eval_gate"] == "best"
    assert t["sftflow.metric.format"] == "chat"
    assert t["sftflow.dataset_manifest_sha256"] == "ab" * 32
    # the loss curves
    (art,) = client.list_artifacts(run.info.run_id)
    assert art.path == "loss.png"
    png = Path(client.download_artifacts(run.info.run_id, "loss.png")).read_bytes()
    assert png.startswith(b"\x89PNG")

    # the same job again (a rerun after a crash past tracking): the same run, nothing new
    again = track_job(_settings(store), _record())
    assert again["run_id"] == tracked["run_id"] and again["reused"]
    assert len(client.search_runs([tracked["experiment_id"]])) == 1


def test_a_failed_job_is_a_failed_run_and_an_unfinished_run_is_replaced(store):
    from mlflow import MlflowClient

    tracker = MlflowTracker(store, "sftflow-test")
    exp = tracker.experiment_id()
    stale = tracker.client.create_run(exp, tags={"sftflow.job": "ft-bad"}).info.run_id  # a crash
    tracked = track_job(_settings(store), _record("ft-bad", "failed", error="boom", loss_history=[]))
    client = MlflowClient(tracking_uri=store)
    assert tracked["run_id"] != stale
    assert [r.info.run_id for r in client.search_runs([exp])] == [tracked["run_id"]]
    run = client.get_run(tracked["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["sftflow.error"] == "boom"
    assert client.list_artifacts(run.info.run_id) == []  # no losses, no curves


def test_an_unreachable_tracker_is_reported_not_raised_within_its_deadline(monkeypatch):
    """Nothing listens on port 9. MLflow's own client retries such a server for minutes (7
    retries, backoff factor 2, 120 s timeouts); with sftflow's settings the job gives up
    within the configured deadline and reports why, whatever the environment says."""
    import time

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(mlflow={"tracking_uri": "http://127.0.0.1:9", "deadline_s": 5})
    started = time.monotonic()
    tracked = track_job(settings, _record())
    assert time.monotonic() - started < 15  # the deadline, with room for a loaded machine
    assert tracked["tracking_uri"] == "http://127.0.0.1:9" and "unreachable" in tracked["error"]
