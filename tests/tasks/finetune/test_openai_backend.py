"""CONTRACT TEST of the ``openai`` backend.

The real OpenAI API is unreachable from this machine, so these tests run the backend against
``tests/contract/openai_server.py``, a local HTTP server implementing the documented files and
fine-tuning jobs endpoints (request/response shapes, errors, job life cycle). The chat JSONL it
uploads comes from a real dataset version in the real S3 of the local stack.
"""

from __future__ import annotations

import json

import pytest

from sftflow.core.errors import ConfigError, SftflowError
from sftflow.tasks.finetune.backends import Hyperparameters, JobSpec
from sftflow.tasks.finetune.dataset import read_version
from sftflow.tasks.finetune.openai_backend import OpenAIBackend
from tests.contract.openai_server import OpenAIContractServer
from tests.tasks._finetune import make_version

pytestmark = pytest.mark.integration

KEY = "sk-contract-test"


@pytest.fixture()
def server():
    with OpenAIContractServer(api_key=KEY) as srv:
        yield srv


def _spec(s3, version: str, job: str, model: str = "gpt-4o-mini-2024-07-18") -> JobSpec:
    return read_version(s3, "datasets", f"qa@{version}").job_spec(
        job=job, base_model=model, method="lora", hyperparameters=Hyperparameters(epochs=2, batch_size=4),
        output_uri=s3.uri(f"models/{job}"))


def _run(backend: OpenAIBackend, job_id: str, polls: int = 10) -> str:
    for _ in range(polls):
        st = backend.status(job_id)
        if st.state in ("succeeded", "failed", "cancelled"):
            return st.state
    raise AssertionError("job did not finish")


def test_validate_upload_create_poll_and_result(s3, server):
    version = make_version(s3, "qa", 30)
    backend = OpenAIBackend(s3, server.base_url, KEY)
    spec = _spec(s3, version, "ft-contract-ok")

    checks = backend.preflight(spec)
    assert checks["train"]["valid"] == 24 and checks["eval"]["valid"] == 6

    job_id = backend.submit(spec)
    assert backend.submit(spec) == job_id  # found by metadata.sftflow_job: no second job
    assert server.state.requests.count(("POST", "/v1/fine_tuning/jobs")) == 1
    assert server.state.requests.count(("POST", "/v1/files")) == 2  # train + validation

    job = server.state.jobs[job_id]
    uploaded = server.state.contents[job["training_file"]].decode().splitlines()
    assert len(uploaded) == 24 and json.loads(uploaded[0])["messages"][-1]["role"] == "assistant"
    assert job["metadata"]["sftflow_job"] == "ft-contract-ok"
    assert job["method"]["supervised"]["hyperparameters"] == {"n_epochs": 2, "batch_size": 4}

    assert _run(backend, job_id) == "succeeded"
    result = backend.result(job_id, spec)
    assert result.fine_tuned_model.startswith("ft:gpt-4o-mini-2024-07-18:sftflow:")
    assert [h["step"] for h in result.history] == [1, 2]
    assert result.metrics["train_loss"] == pytest.approx(1.0)
    assert result.artifacts["training_file"] == job["training_file"]


def test_failed_job_reports_the_providers_error(s3, server):
    version = make_version(s3, "qa", 30)
    backend = OpenAIBackend(s3, server.base_url, KEY)
    job_id = backend.submit(_spec(s3, version, "ft-contract-fail", model="broken-model"))
    assert _run(backend, job_id) == "failed"
    st = backend.status(job_id)
    assert st.error == "training_error: Training diverged at step 1: loss is NaN."
    events = backend.events(job_id)
    assert events[-1]["level"] == "error"


def test_errors_are_clear(s3, server):
    version = make_version(s3, "qa", 30)
    spec = _spec(s3, version, "ft-contract-bad")
    with pytest.raises(SftflowError, match="401 Incorrect API key"):
        OpenAIBackend(s3, server.base_url, "sk-wrong").submit(spec)
    with pytest.raises(SftflowError, match="400 Model no-such-model is not available"):
        OpenAIBackend(s3, server.base_url, KEY).submit(spec.model_copy(update={"base_model": "no-such-model"}))
    with pytest.raises(ConfigError, match="OpenAI API key is not set"):
        OpenAIBackend(s3, server.base_url, None)

    backend = OpenAIBackend(s3, server.base_url, KEY)
    job_id = backend.submit(spec)
    backend.cancel(job_id)
    assert backend.status(job_id).state == "cancelled"


def test_preflight_rejects_too_few_examples_before_any_upload(s3, server):
    version = make_version(s3, "qa", 10)  # 8 train examples < 10
    backend = OpenAIBackend(s3, server.base_url, KEY)
    with pytest.raises(SftflowError, match=r"\(train\) failed validation: 1 x fewer than 10 valid"):
        backend.preflight(_spec(s3, version, "ft-contract-small"))
    assert server.state.requests == []
