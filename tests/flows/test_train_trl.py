"""The ``train-trl`` flow on the real stack: a version built with a system prompt and a few rows
longer than ``max_length`` is trained in chat format on the tiny model; the long rows are
counted and dropped (or fail the run), the loss history is in ``result.json`` and the loss
curves are a PNG in the bucket and Prefect artifacts."""

# ruff: noqa: F811  (pytest fixtures imported from tests.tasks._finetune are test arguments)
from __future__ import annotations

import base64

import pytest

from sftflow.core.errors import SftflowError
from sftflow.flows.train_trl import train_trl
from sftflow.tasks.adapters.s3 import parse_s3_uri
from sftflow.tasks.finetune.backends import Hyperparameters
from sftflow.tasks.finetune.dataset import read_version
from sftflow.tasks.finetune.trl_job import read_result
from sftflow.tasks.runtime.declare import artifact_key
from sftflow.tasks.versions import formats
from sftflow.tasks.versions.commit import CommitRequest, commit_version
from tests.tasks._datasets import final_rows
from tests.tasks._finetune import flow_settings, tiny_chat_model, tiny_model  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.prefect, pytest.mark.train,
              pytest.mark.filterwarnings("ignore::FutureWarning")]

SYSTEM_PROMPT = "Answer in one sentence."
HP = Hyperparameters(max_steps=6, batch_size=4, learning_rate=5e-3, max_length=64)


def _version_with_long_rows(s3) -> str:
    """40 rows (8 eval) of which 3 train rows and 1 eval row are far over 64 tokens."""
    rows = final_rows(40, eval_every=5)
    for i in (1, 2, 3, 10):  # 10 is an eval row
        rows[i]["completion"] = "Item is explained here with a sentence of moderate length. " * 8
        rows[i]["row_hash"] = formats.row_hash(rows[i])
    res = commit_version(s3, CommitRequest(
        dataset="qa", rows=rows, config={"eval_fraction": 0.2, "system_prompt": SYSTEM_PROMPT},
        source={"project_id": 1}, stats={}, shard_rows=1000, system_prompt=SYSTEM_PROMPT))
    return res.version


def _spec(s3, version: str, job: str, model, hp: Hyperparameters):
    data = read_version(s3, "datasets", f"qa@{version}")
    return data.job_spec(job=job, base_model=str(model), method="lora", hyperparameters=hp,
                         output_uri=s3.uri(f"models/{job}"))


def _artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found[0] if found else None


def _latest_run_logs(flow_name: str) -> list[str]:
    """The messages the latest run of ``flow_name`` sent to the Prefect API (its first 200)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # what the run logged is sent before it is read
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                       sort=FlowRunSort.START_TIME_DESC, limit=1)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    return [log.message for log in logs]


def test_chat_training_drops_long_rows_and_draws_the_loss_curves(prefect_harness, flow_settings, s3,
                                                                 tiny_chat_model, tmp_path):
    version = _version_with_long_rows(s3)
    spec = _spec(s3, version, "ft-chat-drop", tiny_chat_model, HP)
    assert spec.chat_train_files  # the OpenAI chat files, system prompt included, are the input
    first = formats.openai_chat_jsonl(final_rows(1), SYSTEM_PROMPT).decode()
    assert first.startswith('{"messages":[{"role":"system","content":"Answer in one sentence."}')

    result = train_trl(spec)

    assert result.status == "succeeded"
    # What reached the run's log is the flow's own lines. With log_prints on, Prefect logged
    # every print made during the training, and `datasets` hashing a function through dill
    # prints its bytecode (dill reads dis.dis from a captured stdout, which Prefect's print
    # bypassed): ~4,600 lines a job, sent to the API, and dill saw no globals in them.
    logs = _latest_run_logs("train-trl")
    assert any("trained ft-chat-drop" in line for line in logs), logs[:5]
    assert not [line for line in logs if "LOAD_GLOBAL" in line or "Disassembly of" in line]
    m = result.metrics
    assert m["format"] == "chat" and m["length_policy"] == "drop" and m["max_length"] == 64
    assert m["rows_total"] == 40 and m["rows_over_max_length"] == 4 and m["max_tokens_seen"] > 64
    assert m["train_rows"] == 32 - 3 and m["eval_rows"] == 8 - 1 and m["steps"] == 6
    assert any("dropped 4 of 40 rows longer than max_length 64" in n for n in result.notes)
    # a loss per step, and the eval split scored along the run
    assert [h["step"] for h in result.history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert len([h for h in result.history if "eval_loss" in h]) >= 3
    assert read_result(s3, s3.uri("models/ft-chat-drop/result.json")).history == result.history

    png_uri = result.artifacts["loss_plot"]
    assert png_uri == s3.uri("models/ft-chat-drop/loss.png")
    png, _ = s3.get_bytes(parse_s3_uri(png_uri)[1])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    key = artifact_key("train", "ft-chat-drop")
    image = _artifact(f"{key}-loss-curve")
    assert image is not None and image.type == "image"
    assert image.data == "data:image/png;base64," + base64.b64encode(png).decode()
    assert _artifact(f"{key}-loss").type == "table"
    summary = _artifact(key).data
    assert "![train (blue) and eval (orange) loss per step](data:image/png;base64," in summary
    assert "dropped 4 of 40 rows" in summary

    # the saved tokenizer keeps the chat template: drafts use the format the model trained on
    from transformers import AutoTokenizer

    from sftflow.tasks.finetune.files import download_prefix

    download_prefix(s3, result.artifacts["model"], tmp_path / "model")
    assert AutoTokenizer.from_pretrained(tmp_path / "model").chat_template


def test_length_policy_fail_fails_the_run_with_the_count(prefect_harness, flow_settings, s3, tiny_model):
    version = _version_with_long_rows(s3)
    spec = _spec(s3, version, "ft-plain-fail", tiny_model,
                 HP.model_copy(update={"length_policy": "fail"}))
    with pytest.raises(SftflowError, match=r"4 rows \(3 train, 1 eval\) are longer than max_length 64"):
        train_trl(spec)
    result = read_result(s3, s3.uri("models/ft-plain-fail/result.json"))
    assert result.status == "failed" and "length_policy=fail" in result.error
    assert not list(s3.list("models/ft-plain-fail/model/"))
