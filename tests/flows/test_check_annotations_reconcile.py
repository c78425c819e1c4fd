"""Issue #18 item 2: a Prefect server restart must not stop the wheel.

A Prefect server of the test's own (its own database, a port in this suite's range) accepts a
version's ``dataset.versioned`` event and is killed (``kill -9``) before any trigger acted on
it; after the restart the deployments are registered again (as ``sftflow serve`` does). No
trigger replays the event, so only the scheduled check's reconciliation can start the
version's fine-tune: exactly one run, and a second check finds that run and starts no other.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sftflow.deployments.serve import CHECK, FINETUNE, ServeConfig, build_deployments
from sftflow.flows.build_dataset import BuildParams, build_dataset
from sftflow.flows.check_annotations import CheckParams, check_annotations
from sftflow.infra.templates import seed
from sftflow.tasks.runtime.polling import wait_until
from sftflow.tasks.versions.keys import DatasetKeys
from tests.conftest import prefect_template, unique
from tests.tasks._datasets import annotation, make_project

pytestmark = [pytest.mark.integration, pytest.mark.prefect]

#: This test's own server: in the test stacks' range (tests/infra/test_stack.py), below the
#: ephemeral ports, moved with SFTFLOW_TEST_STACK_BASE like them.
PORT = int(os.environ.get("SFTFLOW_TEST_STACK_BASE", "21100")) + 700
PREFIX = "datasets"


class OwnPrefectServer:
    """``prefect server start`` as a process group of this test, on one SQLite database that
    outlives a kill -9 (so a restart is a restart, not a fresh server)."""

    def __init__(self, home: Path, port: int):
        self.home, self.port = home, port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        env = {**os.environ, "PREFECT_HOME": str(self.home),
               "PREFECT_SERVER_DATABASE_CONNECTION_URL":
                   f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        prefect = shutil.which("prefect", path=str(Path(sys.executable).parent))
        log = open(self.home / "server.log", "ab")  # noqa: SIM115 - the process's, closed with it
        self.proc = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def healthy() -> bool:
            assert self.proc and self.proc.poll() is None, (self.home / "server.log").read_text()
            try:
                return httpx.get(f"{self.api_url}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(healthy, timeout_s=240), "own Prefect server did not start"

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test started
            self.proc.wait(30)


@pytest.fixture()
def server(tmp_path):
    seed(prefect_template(), tmp_path / "prefect.db")  # migrated once for the machine
    srv = OwnPrefectServer(tmp_path, PORT)
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture()
def project(labelstudio):
    """Six annotated tasks: one version's worth."""
    tasks = [{"data": {"prompt": f"What is tool {i} used for, in one sentence?"},
              "annotations": [annotation(f"Tool {i} is used for job number {i * 7}.")]}
             for i in range(6)]
    p = make_project(labelstudio, unique("t-reco"), tasks)
    yield p
    labelstudio.projects.delete(id=p.id)


def _finetune_runs(deployment_id, target: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[deployment_id])))
    return [r for r in runs if r.parameters["params"].get("dataset") == target]


def test_an_announced_version_whose_trigger_was_lost_in_a_restart_gets_one_finetune(
        server, s3, project):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    dataset = unique("reco")
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        # a build: the server accepts its event, then dies before a trigger acted on it
        built = build_dataset(BuildParams(project=str(project.id), dataset=dataset,
                                          bucket=s3.bucket))
        version = built.version
        assert built.created and s3.head(DatasetKeys.of(PREFIX, dataset).announced(version))
        server.kill()
        server.start()
        cfg = ServeConfig(source=f"s3://{s3.bucket}/prompts/", project=str(project.id),
                          dataset=dataset, min_new=100, base_model="tiny-llama", bucket=s3.bucket)
        ids = {d.name: d.apply() for d in build_deployments(cfg)}  # `sftflow serve` again
        from prefect import get_client

        with get_client(sync_client=True) as client:
            params = client.read_deployment(ids[CHECK]).parameters["params"]
        check = CheckParams.model_validate({**params, "finetune_grace_s": 0})

        report = check_annotations(check)
        runs = _finetune_runs(ids[FINETUNE], f"{dataset}@{version}")
        assert len(runs) == 1, f"{len(runs)} fine-tune runs of the announced {version}"
        assert report.finetune_started and report.finetune_flow_run_id == str(runs[0].id)
        assert runs[0].parameters["params"]["bucket"] == s3.bucket
        assert runs[0].parameters["params"]["base_model"] == "tiny-llama"

        again = check_annotations(check)  # the run is scheduled: found, not started twice
        assert not again.finetune_started and again.finetune_flow_run_id == str(runs[0].id)
        assert len(_finetune_runs(ids[FINETUNE], f"{dataset}@{version}")) == 1
