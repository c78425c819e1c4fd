"""One paid job per (dataset version, config), whatever goes wrong around the submission.

CONTRACT TEST: the real OpenAI API is unreachable from this machine, so the ``openai`` backend
talks to ``tests/contract/openai_server.py`` (the documented files and fine-tuning endpoints;
``state.jobs`` is what was created there), through the fault proxy where a fault is needed.
Datasets and lineage records are in the real SeaweedFS; flows run on the Prefect test harness.

- a creation POST whose answer is lost (504 after the job was created, or a reply held past the
  client's timeout) is not resent blindly: the job is looked up first and adopted;
- two concurrent runs of the same job: the lineage record is claimed with a conditional write,
  one run submits, the other waits for the job it named and watches the same one;
- a run killed (SIGKILL) right after submitting, before its lineage names the job: the rerun
  takes the expired claim over, finds the job by its metadata and completes the lineage.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.tasks._finetune are test arguments)
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest

from sftflow.flows import finetune as finetune_module
from sftflow.flows.finetune import FinetuneParams, finetune
from sftflow.tasks.finetune import lineage
from sftflow.tasks.finetune.openai_backend import OpenAIBackend
from tests.contract.openai_server import OpenAIContractServer
from tests.faults.proxy import Fault, FaultProxy
from tests.tasks._finetune import flow_settings, make_version  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.prefect]

ROOT = Path(__file__).parents[2]
KEY = "sk-contract"
MODEL = "gpt-4o-mini-2024-07-18"
CREATE = r"^/v1/fine_tuning/jobs$"


def _params(s3, **kw) -> FinetuneParams:
    return FinetuneParams(dataset="qa", backend="openai", base_model=MODEL, bucket=s3.bucket,
                          poll_min_s=0.2, poll_max_s=1, deadline_s=120, **kw)


@pytest.fixture()
def api(monkeypatch, flow_settings):
    """(contract server, proxy): the flow's ``openai`` backend goes through the proxy, with a
    1 s client timeout so that a held answer is a timeout."""
    with OpenAIContractServer(api_key=KEY) as server:
        up = urlparse(server.base_url)
        with FaultProxy(up.hostname, up.port) as proxy:
            flow_settings(SFTFLOW_FINETUNE__OPENAI_BASE_URL=server.base_url,
                          SFTFLOW_FINETUNE__OPENAI_API_KEY=KEY)
            monkeypatch.setitem(finetune_module.BACKENDS, "openai", lambda clients: OpenAIBackend(
                clients.s3, f"{proxy.url}/v1", KEY, timeout_s=1.0, retry_delay_s=(0.2, 0.5)))
            yield server, proxy


def _creations(server) -> int:
    return server.state.requests.count(("POST", "/v1/fine_tuning/jobs"))


@pytest.mark.parametrize("fault", [
    Fault("lose_response", method="POST", path=CREATE, status=504),
    Fault("slow_response", method="POST", path=CREATE, seconds=2.5),  # past the 1 s timeout
], ids=["lost-504", "held-past-timeout"])
def test_a_lost_creation_answer_is_looked_up_not_resent(prefect_harness, s3, api, fault):
    server, proxy = api
    make_version(s3, "qa", 30)
    proxy.add(fault)
    report = finetune(_params(s3))
    assert proxy.applied[fault.kind] == 1
    assert len(server.state.jobs) == 1 and _creations(server) == 1
    (job_id,) = server.state.jobs
    assert report.status == "succeeded" and report.backend_job_id == job_id
    assert lineage.load_record(s3, "models", report.job).backend_job_id == job_id


def test_two_concurrent_runs_submit_one_job(prefect_harness, s3, api):
    server, proxy = api
    make_version(s3, "qa", 30)
    proxy.add(Fault("delay", method="POST", path=r"^/v1/(files|fine_tuning/jobs)$", seconds=0.8,
                    times=0))  # slow uploads and creation (within the 1 s timeout)
    reports, errors = [], []

    def run() -> None:
        try:
            reports.append(finetune(_params(s3)))
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(server.state.jobs) == 1 and _creations(server) == 1
    (job_id,) = server.state.jobs
    assert [r.backend_job_id for r in reports] == [job_id, job_id]
    assert {r.status for r in reports} == {"succeeded"}
    assert lineage.load_record(s3, "models", reports[0].job).backend_job_id == job_id


_CHILD = """
import sys
from sftflow.flows.finetune import FinetuneParams, finetune
finetune(FinetuneParams(dataset="qa", backend="openai", base_model=sys.argv[1], bucket=sys.argv[2],
                        poll_min_s=0.2, poll_max_s=1, deadline_s=120))
"""


def test_a_run_killed_after_submitting_is_adopted_by_the_rerun(prefect_harness, s3, flow_settings):
    from prefect.settings import PREFECT_API_URL

    make_version(s3, "qa", 30)
    with OpenAIContractServer(api_key=KEY) as server:
        flow_settings(SFTFLOW_FINETUNE__OPENAI_BASE_URL=server.base_url,
                      SFTFLOW_FINETUNE__OPENAI_API_KEY=KEY)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": str(PREFECT_API_URL.value()),
               "SFTFLOW_FAILPOINTS": "finetune.after-submit=crash"}
        child = subprocess.run([sys.executable, "-c", _CHILD, MODEL, s3.bucket], cwd=ROOT, env=env, check=False,
                               capture_output=True, text=True, timeout=300)
        assert child.returncode == -9, child.stderr[-3000:]  # killed at the failpoint
        assert len(server.state.jobs) == 1
        (job_id,) = server.state.jobs
        (job,) = lineage.list_jobs(s3, "models")
        assert lineage.load_record(s3, "models", job).backend_job_id is None  # not named yet

        # The dead run's claim is live for its whole TTL (900 s by default): the rerun must not
        # wait it out, but find the job the provider already has and adopt it.
        report = finetune(_params(s3, claim_ttl_s=900))
        assert report.job == job and report.status == "succeeded" and report.backend_job_id == job_id
        assert len(server.state.jobs) == 1 and _creations(server) == 1
        record = lineage.load_record(s3, "models", job)
        assert record.backend_job_id == job_id and record.status == "succeeded"
