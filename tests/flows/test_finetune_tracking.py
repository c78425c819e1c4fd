"""Tracking and pictures of fine-tune runs on the real stack: two ``trl`` jobs trained in-process
(``trl_mode=local``) on the tiny chat model, MLflow on a file store in tmp_path. The lineage
record keeps the loss per step and names its MLflow run, which holds params, the loss history
and the dataset version as input; the second job's sample outputs sit beside the first's."""

# ruff: noqa: F811  (pytest fixtures imported from tests.tasks._finetune are test arguments)
from __future__ import annotations

import pytest

from sftflow.flows.finetune import FinetuneParams, finetune
from sftflow.tasks.finetune import lineage
from sftflow.tasks.finetune.backends import Hyperparameters
from sftflow.tasks.finetune.tracking import metric_history
from sftflow.tasks.runtime.declare import artifact_key
from tests.tasks._finetune import flow_settings, make_version, tiny_chat_model  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.prefect, pytest.mark.train,
              pytest.mark.filterwarnings("ignore::FutureWarning")]

HP = Hyperparameters(max_steps=6, batch_size=4, learning_rate=5e-3, max_length=64)


def _artifacts(*keys: str) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys))))
    return {a.key: a for a in found}


def test_jobs_are_tracked_in_mlflow_and_show_loss_curves_and_samples(prefect_harness, flow_settings, s3,
                                                                     tiny_chat_model, tmp_path):
    from mlflow import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    flow_settings(SFTFLOW_FINETUNE__TRL_MODE="local", SFTFLOW_MLFLOW__TRACKING_URI=store,
                  SFTFLOW_MLFLOW__EXPERIMENT="qa-runs")
    make_version(s3, "qa", 40)
    params = {"dataset": "qa", "base_model": str(tiny_chat_model), "bucket": s3.bucket,
              "hyperparameters": HP, "poll_min_s": 0.5, "poll_max_s": 2, "deadline_s": 300}
    first = finetune(FinetuneParams(**params))
    rec = lineage.load_record(s3, "models", first.job)

    # the loss per step is in the lineage record (JobResult.history), and names the MLflow run
    assert [h["step"] for h in rec.loss_history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert rec.tracking["tracking_uri"] == store and rec.tracking["run_id"]
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(rec.tracking["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["dataset"] == "qa"
    assert run.data.params["hp.max_steps"] == "6" and run.data.tags["sftflow.lineage_uri"] == rec.lineage_uri
    assert [s for s, _ in metric_history(client, run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert run.data.metrics["eval_loss"] == rec.metrics["eval_loss"]
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == f"qa@{rec.version}" and rec.dataset_manifest in inp.dataset.source
    assert f"MLflow run: `{run.info.run_id}`" in rec.summary_markdown()

    # a second version: its job is compared with the first, and both answer the eval prompts
    make_version(s3, "qa", 60)
    second = finetune(FinetuneParams(**{**params, "method": "full"}))
    key = artifact_key("train", second.job)
    arts = _artifacts(f"{key}-loss-curve", f"{key}-samples")
    assert arts[f"{key}-loss-curve"].type == "image"
    assert arts[f"{key}-loss-curve"].data.startswith("data:image/png;base64,")
    samples = arts[f"{key}-samples"]
    assert samples.type == "table"
    import json

    table = json.loads(samples.data)
    assert len(table) == 3
    assert set(table[0]) == {"prompt", "reference", f"new ({second.job})", f"previous ({first.job})"}
    assert not any(str(v).startswith("(error") for row in table for v in row.values())
    runs = client.search_runs([rec.tracking["experiment_id"]])
    assert {r.data.tags["sftflow.job"] for r in runs} == {first.job, second.job}
