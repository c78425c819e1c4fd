"""The finetune flow on the real stack: real dataset versions in S3, the ``train-trl`` flow run
as its own deployment by a Prefect process worker, TRL training of a tiny local model, lineage
read back from the bucket; the ``openai`` backend against its contract-test server."""

# ruff: noqa: F811  (pytest fixtures imported from tests.tasks._finetune are test arguments)
from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from sftflow.core import events
from sftflow.core.errors import SftflowError
from sftflow.flows.finetune import FinetuneParams, finetune
from sftflow.tasks.adapters.s3 import parse_s3_uri
from sftflow.tasks.finetune import few_shot, lineage
from sftflow.tasks.finetune.backends import Hyperparameters
from sftflow.tasks.finetune.dataset import read_version
from sftflow.tasks.finetune.files import read_json, read_lines
from sftflow.tasks.finetune.tiny_model import CHAT_TEMPLATE
from sftflow.tasks.runtime.polling import Backoff, wait_until
from sftflow.tasks.versions.refs import get_tag
from tests.contract.openai_server import OpenAIContractServer
from tests.tasks._finetune import (  # noqa: F401
    flow_settings,
    make_version,
    tiny_chat_model,
    tiny_model,
    train_worker,
)

pytestmark = [pytest.mark.integration, pytest.mark.prefect, pytest.mark.train,
              pytest.mark.filterwarnings("ignore::FutureWarning")]

HP = Hyperparameters(max_steps=8, batch_size=4, learning_rate=5e-3, max_length=64)


def _params(s3, dataset: str, base_model, **kw) -> FinetuneParams:
    return FinetuneParams(dataset=dataset, base_model=str(base_model), bucket=s3.bucket,
                          hyperparameters=kw.pop("hyperparameters", HP), poll_min_s=0.5,
                          poll_max_s=2, deadline_s=300, **kw)


def _finetune_events(job: str, timeout_s: float = 20) -> list[str]:
    """Event names the Prefect API stored for a model resource (waits for delivery)."""
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    EventsWorker.drain_all()
    body = {"filter": {"event": {"prefix": ["sftflow.finetune."]},
                       "any_resource": {"id": [events.model_resource(job)["prefect.resource.id"]]},
                       "occurred": {"since": "2020-01-01T00:00:00Z"}}, "limit": 50}
    names: list[str] = []

    def ended() -> bool:
        resp = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10)
        resp.raise_for_status()
        names[:] = sorted(e["event"] for e in resp.json()["events"])
        return any(n != events.FINETUNE_SUBMITTED for n in names)

    wait_until(ended, timeout_s=timeout_s, backoff=Backoff(0.5, 1.0))
    return names


def _result_summary(job: str) -> str:
    """The ``finetune-result`` markdown artifact of ``job`` (the flow's fine-tune summary)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["finetune-result"])))
    return next(a.data for a in found if a.data.startswith(f"# Fine-tune {job}:"))


def _assert_three_numbers(s3, job: str, shots: dict, gate: dict, previous: str | None) -> None:
    """The eval gate's three losses in the lineage and in the summary artifact (#20)."""
    rec = lineage.load_record(s3, "models", job)
    assert rec.eval_gate == gate and rec.few_shot.model_dump(mode="json") == shots
    assert gate["eval_loss"] == rec.metrics["eval_loss"] and gate["baseline_job"] == previous
    assert gate["few_shot_eval_loss"] == shots["eval_loss"] == rec.metrics["few_shot_eval_loss"] > 0
    assert (gate["baseline_eval_loss"] is None) == (previous is None)
    summary = _result_summary(job)
    assert summary == rec.summary_markdown()
    assert f"| new model | `{job}` | {gate['eval_loss']:.4f} |" in summary
    assert (f"| previous best | `{previous}` | {gate['baseline_eval_loss']:.4f} |" if previous
            else "| previous best | none | n/a |") in summary
    assert (f"| few-shot base | `{shots['base_model']}` with 3 train rows in its prompt (seed 0) | "
            f"{shots['eval_loss']:.4f} |") in summary


def _train_chat_rows(s3, dataset: str, version: str) -> list[list[dict]]:
    data = read_version(s3, "datasets", f"{dataset}@{version}")
    return [json.loads(line)["messages"] for uri in data.uris("train", "openai_chat")
            for line in read_lines(s3, uri) if line.strip()]


def _deployment_runs(name: str = "train-trl/default") -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(name)
        return len(client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))))


def test_trl_job_runs_on_the_work_pool_records_lineage_and_is_not_trained_twice(
    prefect_harness, train_worker, flow_settings, s3, tiny_chat_model
):
    tiny_model = tiny_chat_model  # trains in chat format through its template
    version = make_version(s3, "qa", 40)
    report = finetune(_params(s3, "qa", tiny_model))

    assert report.status == "succeeded" and not report.reused and report.version == version
    rec = lineage.load_record(s3, "models", report.job).to_dict()
    raw = s3.get_bytes(f"datasets/qa/versions/{version}/manifest.json")[0]
    assert rec["dataset_manifest_sha256"] == hashlib.sha256(raw).hexdigest()
    assert rec["status"] == "succeeded" and rec["backend"] == "trl" and rec["method"] == "lora"
    assert rec["base_model"] == str(tiny_model) and rec["hyperparameters"]["max_steps"] == 8
    assert rec["history"][0]["event"] == "submitted"
    assert rec["history"][-1]["event"] == "recorded"
    assert rec["metrics"]["steps"] == 8 and rec["metrics"]["train_rows"] == 32
    assert rec["metrics"]["eval_rows"] == 8 and rec["metrics"]["eval_loss"] > 0
    assert rec["metrics"]["format"] == "chat" and rec["metrics"]["rows_over_max_length"] == 0
    assert rec["artifacts"]["loss_plot"] == s3.uri(f"models/{report.job}/loss.png")
    # what decided the token stream: tokenizer and template, mask coverage, versions, seed, batches
    stream = rec["training_record"]
    assert stream["tokenizer"] == str(tiny_model) and len(stream["tokenizer_sha256"]) == 64
    assert stream["chat_template_sha256"] == hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()
    assert (stream["format"], stream["loss"], stream["seed"], stream["batch_size"]) == ("chat", "completion", 42, 4)
    cov = stream["coverage"]
    assert cov["rows"] == 32 and cov["rows_zero_trained"] == 0 and 0 < cov["trained_tokens_min"]
    assert cov["trained_tokens_min"] <= cov["trained_tokens_median"] and cov["max_length"] == 64
    assert cov["rows_truncated"] == cov["rows_dropped_over_max_length"] == 0
    assert {"trl", "transformers", "torch", "peft"} <= set(stream["versions"])
    assert len(stream["batches"]) == 4 and stream["batches_observed"] is True  # as the trainer drew them

    # the training ran as a flow run of the deployment, through the worker
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(rec["backend_job_id"])
        dep = client.read_deployment(run.deployment_id)
    assert dep.name == "default" and dep.work_pool_name == train_worker
    assert run.state.is_completed() and run.name.endswith(f" job {report.job}")  # train D@V job J

    # the adapter and its tokenizer are in the bucket, next to the result
    model_keys = {o.key.rsplit("/", 1)[-1] for o in s3.list(f"models/{report.job}/model/")}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= model_keys
    assert rec["artifacts"]["model"] == s3.uri(f"models/{report.job}/model")

    # eval gate: the first model of the dataset is its best (it beats the base model given 3
    # train rows, chosen by seed 0, in its prompt: scored by the training job on the same eval
    # rows, cached for the version); the version is tagged
    assert rec["eval_gate"]["decision"] == "best" and rec["eval_gate"]["tagged_best"]
    shots = rec["few_shot"]
    assert (shots["k"], shots["seed"], shots["eval_rows"], shots["cached"]) == (3, 0, 8, False)
    assert (shots["base_model"], shots["dataset"], shots["version"]) == (str(tiny_model), "qa", version)
    train_rows = _train_chat_rows(s3, "qa", version)
    assert shots["examples"] == few_shot.choose_examples(train_rows, list(range(32)), 3, 0)
    assert shots["examples_sha256"] == [few_shot.row_sha256(train_rows[i]) for i in shots["examples"]]
    assert read_json(s3, few_shot.cache_uri(s3.uri("models"), shots["cache_key"]))["eval_loss"] == shots["eval_loss"]
    assert rec["eval_gate"]["eval_loss"] < shots["eval_loss"] and rec["eval_gate"]["beats_few_shot"]
    _assert_three_numbers(s3, report.job, shots, rec["eval_gate"], None)
    assert lineage.read_model_ref(s3, "models", "qa")[0] == report.job
    assert get_tag(s3, "qa", f"trained-{report.job}") == version
    assert _finetune_events(report.job) == [events.FINETUNE_SUBMITTED, events.FINETUNE_SUCCEEDED]

    # same version + same config: the earlier job, no second training run
    runs = _deployment_runs()
    again = finetune(_params(s3, f"qa@{version}", tiny_model))
    assert again.reused and again.job == report.job and again.metrics == report.metrics
    assert _deployment_runs() == runs

    # a new version is trained in-process (trl_mode=local) and compared with the best on its eval
    flow_settings(SFTFLOW_FINETUNE__TRL_MODE="local")
    v2 = make_version(s3, "qa", 60, start=0, tag="")
    second = finetune(_params(s3, "qa", tiny_model, method="full"))
    assert second.version == v2 and second.backend_job_id.startswith("local:")
    gate = second.eval_gate
    assert gate["baseline_job"] == report.job and gate["baseline_eval_loss"] > 0
    assert second.few_shot["version"] == v2 and second.few_shot["eval_rows"] == 12
    better = gate["eval_loss"] < gate["baseline_eval_loss"] and gate["eval_loss"] < gate["few_shot_eval_loss"]
    assert gate["tagged_best"] is better and gate["decision"] == ("best" if better else "not better")
    _assert_three_numbers(s3, second.job, second.few_shot, gate, report.job)
    assert lineage.read_model_ref(s3, "models", "qa")[0] == (second.job if better else report.job)
    assert {"config.json", "model.safetensors"} <= {
        o.key.rsplit("/", 1)[-1] for o in s3.list(f"models/{second.job}/model/")}
    assert [r.job for r in lineage.list_records(s3, "models", "qa")] == [report.job, second.job]

    # `models reproduce`: the version and the tokenizer the record names give the same stream
    from typer.testing import CliRunner

    from sftflow.cli import app

    cli = CliRunner()
    res = cli.invoke(app, ["models", "reproduce", report.job, "--bucket", s3.bucket, "--json"])
    assert res.exit_code == 0, res.output
    verdict = json.loads(res.stdout)
    assert verdict["identical"] and verdict["rows_identical"] and verdict["first_differing_batch"] is None
    assert verdict["recomputed"]["batches"] == stream["batches"] and verdict["batches_compared"] == 4
    # a record whose second batch is not the stream's: exit 1, naming it
    lineage.update_record(s3, "models", report.job, {"training_record": {
        **stream, "batches": [stream["batches"][0], "0" * 64, *stream["batches"][2:]]}})
    res = cli.invoke(app, ["models", "reproduce", report.job, "--bucket", s3.bucket])
    assert res.exit_code == 1 and "token stream differs" in res.output
    assert "first differing batch: 1" in res.output


def test_bad_input_fails_before_anything_is_submitted(prefect_harness, flow_settings, s3, tiny_model):
    version = make_version(s3, "qa", 20)
    flow_settings(SFTFLOW_FINETUNE__TRL_MODE="local")

    with pytest.raises(SftflowError, match=r"fails the fine-tune gates: train rows is 16 \(need >= 100\)"):
        finetune(_params(s3, "qa", tiny_model, min_train_rows=100))
    with pytest.raises(SftflowError, match="base model not found: no config.json in folder /nope"):
        finetune(_params(s3, "qa", "/nope/model"))
    with pytest.raises(SftflowError, match="base model not found: no config.json under s3://"):
        finetune(_params(s3, "qa", s3.uri("no/such/model")))
    with pytest.raises(SftflowError, match="has no version or tag 'v0'"):
        finetune(_params(s3, "qa@v0", tiny_model))

    shard = read_version(s3, "datasets", f"qa@{version}").uris("train", "parquet")[0]
    s3.put_bytes(parse_s3_uri(shard)[1], b"corrupt")
    with pytest.raises(SftflowError, match=f"checksum mismatch for s3://{s3.bucket}/datasets/qa/shards/"):
        finetune(_params(s3, "qa", tiny_model))

    assert lineage.list_jobs(s3, "models") == []  # nothing was submitted


def test_missing_training_deployment_is_a_clear_error(prefect_harness, flow_settings, s3, tiny_model):
    make_version(s3, "qa", 20)
    flow_settings(SFTFLOW_FINETUNE__TRL_DEPLOYMENT="train-trl/nowhere")
    with pytest.raises(SftflowError, match="training deployment 'train-trl/nowhere' not found"):
        finetune(_params(s3, "qa", tiny_model))
    assert lineage.list_jobs(s3, "models") == []


def test_openai_backend_contract_success_then_failed_job(prefect_harness, flow_settings, s3):
    """Contract test: the real OpenAI API is unreachable here (see tests/contract/openai_server.py)."""
    make_version(s3, "qa", 30)
    with OpenAIContractServer(api_key="sk-contract") as srv:
        flow_settings(SFTFLOW_FINETUNE__OPENAI_BASE_URL=srv.base_url,
                      SFTFLOW_FINETUNE__OPENAI_API_KEY="sk-contract")
        ok = finetune(_params(s3, "qa", "gpt-4o-mini-2024-07-18", backend="openai"))
        assert ok.status == "succeeded" and ok.fine_tuned_model.startswith("ft:gpt-4o-mini")
        rec = lineage.load_record(s3, "models", ok.job)
        assert rec.fine_tuned_model == ok.fine_tuned_model and rec.eval_gate is None
        # no few-shot baseline at a provider: said in the record, and no eval gate
        assert rec.few_shot.eval_loss is None and (rec.few_shot.k, rec.few_shot.seed) == (3, 0)
        assert rec.few_shot.skipped.startswith("backend openai trains at the provider")
        assert f"- few-shot baseline: skipped ({rec.few_shot.skipped})" in rec.summary_markdown()
        assert rec.preflight["train"]["valid"] == 24
        assert "sk-contract" not in rec.model_dump_json() and "sk-contract" not in ok.model_dump_json()

        with pytest.raises(SftflowError, match="training_error: Training diverged at step 1"):
            finetune(_params(s3, "qa", "broken-model", backend="openai"))
        failed = next(r for r in lineage.list_records(s3, "models") if r.base_model == "broken-model")
        assert failed.status == "failed" and "loss is NaN" in failed.error
        assert _finetune_events(failed.job) == [events.FINETUNE_FAILED, events.FINETUNE_SUBMITTED]

        # a rerun fails again with the recorded error, and never starts a second job
        jobs_before = len(srv.state.jobs)
        with pytest.raises(SftflowError, match="already ended failed"):
            finetune(_params(s3, "qa", "broken-model", backend="openai"))
        assert len(srv.state.jobs) == jobs_before == 2

        # the CLI: same job again (reused), then the lineage through `models list | show`
        from typer.testing import CliRunner

        from sftflow.cli import app

        cli = CliRunner()
        res = cli.invoke(app, ["finetune", "--dataset", "qa", "--backend", "openai", "--base-model",
                               "gpt-4o-mini-2024-07-18", "--bucket", s3.bucket, "--max-steps", "8",
                               "--batch-size", "4", "--learning-rate", "5e-3", "--max-length", "64",
                               "--json"])
        assert res.exit_code == 0, res.output
        out = json.loads(res.output)
        assert out["job"] == ok.job and out["reused"] and out["status"] == "succeeded"
    res = cli.invoke(app, ["models", "list", "--bucket", s3.bucket, "--json"])
    listed = {r["job"]: r for r in json.loads(res.output)}
    assert listed[ok.job]["status"] == "succeeded" and listed[failed.job]["status"] == "failed"
    res = cli.invoke(app, ["models", "show", failed.job, "--bucket", s3.bucket, "--json"])
    shown = json.loads(res.output)
    assert shown == {**failed.to_dict(), "best": False}
    assert "sk-contract" not in res.output
