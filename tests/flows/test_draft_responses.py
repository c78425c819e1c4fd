"""The draft-responses flow on the real stack (Prefect test harness, SeaweedFS, Label Studio):
a model recorded the way the finetune flow records it (a real dataset version exported from
the project, a lineage record, the ``best`` ref, the weights under ``<job>/model/``) drafts
the project's open tasks, with the tiny model through transformers, or through the OpenAI
contract server's chat endpoint (CONTRACT TEST: the real API is unreachable from here)."""

# ruff: noqa: F811  (pytest fixtures imported from tests helpers are test arguments)
from __future__ import annotations

import httpx
import pytest

from sftflow.core import events
from sftflow.flows.draft_responses import DraftParams, draft_responses
from sftflow.tasks.finetune import lineage
from sftflow.tasks.finetune.backends import Hyperparameters
from sftflow.tasks.finetune.dataset import read_version
from sftflow.tasks.runtime.polling import Backoff, wait_until
from sftflow.tasks.versions.commit import CommitRequest, commit_version
from tests.contract.openai_server import OpenAIContractServer
from tests.tasks._datasets import final_rows
from tests.tasks._drafts import predictions, sft_project, texts  # noqa: F401
from tests.tasks._finetune import flow_settings, tiny_model  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.prefect,
              pytest.mark.filterwarnings("ignore::FutureWarning")]

PROMPTS = [f"Prompt {i}: explain item {i} in a sentence." for i in range(5)]


def record_model(s3, project_id: int, weights, *, method: str = "full", best: bool = True,
                 backend: str = "trl", fine_tuned_model: str | None = None) -> str:
    """A succeeded job on a version built from ``project_id``, as the finetune flow leaves it."""
    rows = final_rows(12, tag=f"-{method}-{backend}")
    version = commit_version(s3, CommitRequest(
        dataset="support", rows=rows, config={"system_prompt": "Answer in one sentence."},
        source={"project_id": project_id}, stats={}, shard_rows=100)).version
    data = read_version(s3, "datasets", f"support@{version}")
    config = lineage.job_config(backend, "tiny", method, Hyperparameters())
    job = lineage.job_name(data.manifest_sha256, config)
    artifacts = {}
    if weights is not None:
        for path in sorted(weights.iterdir()):
            s3.put_bytes(f"models/{job}/model/{path.name}", path.read_bytes())
        artifacts["model"] = s3.uri(f"models/{job}/model")
    lineage.create_record(s3, "models", lineage.LineageRecord.submitted(
        job=job, data=data, config=config, baseline=None, preflight={},
        lineage_uri=s3.uri(lineage.manifest_key("models", job)), run_id="test"))
    lineage.update_record(s3, "models", job, {"status": "succeeded", "artifacts": artifacts,
                                              "fine_tuned_model": fine_tuned_model})
    if best:
        _, etag = lineage.read_model_ref(s3, "models", "support")
        lineage.set_model_ref(s3, "models", "support", job, etag)
    return job


def drafts_events(project_id: int, timeout_s: float = 20) -> list[dict]:
    """``sftflow.drafts.written`` events the Prefect API stored for the project."""
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL

    EventsWorker.drain_all()
    body = {"filter": {"event": {"name": [events.DRAFTS_WRITTEN]},
                       "any_resource": {"id": [events.project_resource(project_id)["prefect.resource.id"]]},
                       "occurred": {"since": "2020-01-01T00:00:00Z"}}, "limit": 10}

    def found() -> list[dict]:
        resp = httpx.post(f"{PREFECT_API_URL.value()}/events/filter", json=body, timeout=10)
        resp.raise_for_status()
        return resp.json()["events"]

    return wait_until(found, timeout_s=timeout_s, backoff=Backoff(0.5, 1.0))


@pytest.mark.train
def test_the_best_model_drafts_every_open_task_once_with_transformers(
        prefect_harness, s3, flow_settings, labelstudio, sft_project, tiny_model):
    project = sft_project(PROMPTS, annotate=2)
    job = record_model(s3, project.id, tiny_model)
    params = DraftParams(job=job, max_new_tokens=8, batch_size=2, page_size=2)

    report = draft_responses(params)  # the project comes from the version's source
    assert (report.project_id, report.model_version, report.generator) == (project.id, job, "transformers")
    assert (report.drafted, report.skipped, report.failed_total) == (3, {"annotated": 2}, 0)
    assert predictions(labelstudio, project.id) == {(t, job): 1 for t in project.open}
    assert all(texts(labelstudio, project.id, job).values())
    settings = labelstudio.projects.get(id=project.id)
    assert (settings.model_version, settings.show_collab_predictions) == (job, True)
    [event] = drafts_events(project.id)
    assert event["payload"]["drafted"] == 3 and event["payload"]["model_version"] == job

    again = draft_responses(params)
    assert (again.drafted, again.skipped) == (0, {"annotated": 2, "already_drafted": 3})
    assert predictions(labelstudio, project.id) == {(t, job): 1 for t in project.open}


def test_contract_a_hosted_model_drafts_through_the_chat_endpoint_and_a_demoted_one_does_not(
        prefect_harness, s3, flow_settings, labelstudio, sft_project):
    project = sft_project(PROMPTS[:3])
    with OpenAIContractServer(api_key="sk-drafts") as server:
        flow_settings(SFTFLOW_DRAFTS__BASE_URL=server.base_url, SFTFLOW_DRAFTS__API_KEY="sk-drafts")
        loser = record_model(s3, project.id, None, backend="openai", best=False,
                             fine_tuned_model="gpt-4o-mini-2024-07-18")
        assert draft_responses(DraftParams(job=loser, generator="openai")) is None
        assert predictions(labelstudio, project.id) == {}

        job = record_model(s3, project.id, None, method="lora", backend="openai",
                           fine_tuned_model="gpt-4o-mini-2024-07-18")
        report = draft_responses(DraftParams(dataset="support", project=str(project.id),
                                             generator="openai"))
        assert (report.model_version, report.drafted) == (job, 3)
        assert texts(labelstudio, project.id, job) == {t: f"Draft: {p}" for p, t in project.tasks.items()}
        systems = {b["messages"][0]["content"] for b in server.state.chats}
        assert systems == {"Answer in one sentence."}  # the version's system prompt


def test_contract_the_cli_drafts_with_the_best_model_and_a_demoted_job_only_when_asked(
        prefect_harness, s3, flow_settings, labelstudio, sft_project):
    """``sftflow drafts`` runs the same flow: ``--json`` prints its report; a job that is not
    its dataset's best drafts nothing unless ``--any-model``; a rerun drafts nothing new."""
    import json

    from typer.testing import CliRunner

    from sftflow.cli import app

    project = sft_project(PROMPTS[:3], annotate=1)
    with OpenAIContractServer(api_key="sk-drafts") as server:
        flow_settings(SFTFLOW_DRAFTS__BASE_URL=server.base_url, SFTFLOW_DRAFTS__API_KEY="sk-drafts")
        best = record_model(s3, project.id, None, method="lora", backend="openai",
                            fine_tuned_model="gpt-4o-mini-2024-07-18")
        loser = record_model(s3, project.id, None, backend="openai", best=False,
                             fine_tuned_model="gpt-4o-mini-2024-07-18")
        cli = CliRunner()
        demoted = cli.invoke(app, ["drafts", "--job", loser, "--generator", "openai", "--json"])
        assert demoted.exit_code == 0, demoted.output
        assert json.loads(demoted.stdout)["drafted"] == 0
        assert predictions(labelstudio, project.id) == {}

        first = cli.invoke(app, ["drafts", "--dataset", "support", "--generator", "openai",
                                 "--json"])
        assert first.exit_code == 0, first.output
        report = json.loads(first.stdout)
        assert (report["model_version"], report["drafted"], report["skipped"]) == (
            best, 2, {"annotated": 1})
        forced = cli.invoke(app, ["drafts", "--job", loser, "--generator", "openai",
                                  "--any-model", "--json"])
        assert json.loads(forced.stdout)["drafted"] == 2
        again = cli.invoke(app, ["drafts", "--dataset", "support", "--generator", "openai",
                                 "--json"])
        assert json.loads(again.stdout)["skipped"] == {"annotated": 1, "already_drafted": 2}
    assert predictions(labelstudio, project.id) == {
        **{(t, best): 1 for t in project.open}, **{(t, loser): 1 for t in project.open}}
