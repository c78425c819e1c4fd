"""A killed flow process does not leave its run RUNNING forever (deployments/zombies.py).

On a real Prefect API (the test harness, whose server runs triggers and automations): a flow
run tagged ``sftflow`` runs in a subprocess with the heartbeat environment sftflow gives its
flow processes; once its first heartbeat is on the server, the process is killed with
``kill -9``. The zombie automation marks the run CRASHED within the deadline (the automation's
``within`` is set to Prefect's minimum, 10 s, so the test waits on seconds, not minutes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from uuid import UUID

import httpx
import pytest

from sftflow.tasks.runtime.polling import Backoff, wait_until
from tests.deployments.test_triggers import triggers_loaded

pytestmark = pytest.mark.prefect
HEARTBEAT_ENV_NAME = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"

#: The flow process: prints its run id, then runs until killed.
CHILD = """
import time
from prefect import flow, runtime, tags

@flow(name="sftflow-zombie-probe")
def probe() -> None:
    print(runtime.flow_run.id, flush=True)
    time.sleep(600)

with tags("sftflow"):
    probe()
"""


def _heartbeats(api_url: str, run_id: str) -> int:
    """Heartbeat events of ``run_id`` the server has stored."""
    body = {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                       "resource": {"id": [f"prefect.flow-run.{run_id}"]}}, "limit": 5}
    response = httpx.post(f"{api_url}/events/filter", json=body, timeout=10)
    response.raise_for_status()
    return len(response.json()["events"])


def _state(run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(run_id)).state.type.value


def test_a_killed_flow_process_ends_crashed(prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from sftflow.deployments.zombies import (
        ZOMBIE_AUTOMATION,
        ensure_zombie_automation,
        heartbeat_env,
    )

    api_url = PREFECT_API_URL.value()
    first = ensure_zombie_automation(heartbeat_s=30)  # within 90 s
    # Idempotent: the one automation of that name is brought up to date, never duplicated.
    assert ensure_zombie_automation(heartbeat_s=30, within_s=10) == first
    assert ensure_zombie_automation(heartbeat_s=30, within_s=10) == first
    with get_client(sync_client=True) as client:
        (automation,) = client.read_automations_by_name(ZOMBIE_AUTOMATION)
    assert automation.trigger.within.total_seconds() == 10
    triggers_loaded()

    env = {**os.environ, **heartbeat_env(30), "PREFECT_API_URL": api_url}
    child = subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        run_id = child.stdout.readline().strip()
        assert run_id, f"the flow process exited ({child.poll()}) before its run started"
        assert wait_until(lambda: _heartbeats(api_url, run_id), timeout_s=30,
                          backoff=Backoff(0.3, 1.0)), "no heartbeat of the run reached the server"
        assert _state(run_id) == "RUNNING"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        final = wait_until(lambda: _state(run_id) == "CRASHED" or None, timeout_s=45,
                           backoff=Backoff(0.5, 1.0))
        assert final, f"run {run_id} still {_state(run_id)} 45 s after its process was killed"
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
        with get_client(sync_client=True) as client:
            for automation in client.read_automations_by_name(ZOMBIE_AUTOMATION):
                client.delete_automation(automation.id)


def test_every_flow_process_gets_the_heartbeat_the_automation_expects():
    """The worker deployments of prefect.yaml run their flow processes with the configured
    heartbeat, and the automation waits 3 heartbeats (scoped to the sftflow tag)."""
    from pathlib import Path

    import yaml

    from sftflow.core.settings import Settings
    from sftflow.deployments.zombies import HEARTBEAT_ENV, heartbeat_env, zombie_automation

    heartbeat_s = Settings().prefect.heartbeat_s
    assert heartbeat_env(heartbeat_s) == {HEARTBEAT_ENV: str(heartbeat_s)}
    doc = yaml.safe_load((Path(__file__).parents[2] / "deployments" / "prefect.yaml").read_text())
    for deployment in doc["deployments"]:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert env == {HEARTBEAT_ENV: str(heartbeat_s)}, deployment["name"]
        assert "sftflow" in deployment["tags"]
    trigger = zombie_automation(heartbeat_s).trigger
    assert trigger.within.total_seconds() == 3 * heartbeat_s
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed"} <= trigger.expect
    assert trigger.match_related.root == {"prefect.resource.role": "tag",
                                          "prefect.resource.id": "prefect.tag.sftflow"}


#: `sftflow serve`'s path (serve_deployments) serving one probe deployment tagged sftflow.
SERVED = """
import os, time
from prefect import flow
from prefect.settings import get_current_settings

@flow(name="sftflow-zombie-served")
def probe() -> None:
    with open(os.environ["PROBE_OUT"], "w") as out:
        out.write(f"{get_current_settings().flows.heartbeat_frequency}")
    time.sleep(600)

if __name__ == "__main__":
    from sftflow.deployments.serve import serve_deployments
    serve_deployments([probe.to_deployment(name="zombie-probe", tags=["sftflow"])],
                      zombie_within_s=10)
"""


def test_a_killed_serve_process_leaves_its_run_crashed(prefect_harness, tmp_path):
    """`sftflow serve` killed with -9 (with its flow run's process): the run ends CRASHED."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    from sftflow.deployments.zombies import ZOMBIE_AUTOMATION

    api_url = PREFECT_API_URL.value()
    script, out = tmp_path / "served.py", tmp_path / "probe.out"
    script.write_text(SERVED)
    env = {**os.environ, "PREFECT_API_URL": api_url, "PROBE_OUT": str(out),
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", "SFTFLOW_PREFECT__HEARTBEAT_S": "30"}
    env.pop(HEARTBEAT_ENV_NAME, None)
    server = subprocess.Popen([sys.executable, str(script)], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL)

    def deployed() -> list:
        with get_client(sync_client=True) as client:
            return [d for d in client.read_deployments() if d.name == "zombie-probe"]

    try:
        assert wait_until(deployed, timeout_s=60, backoff=Backoff(0.5, 1.0)), \
            f"serve did not register its deployment (exit {server.poll()})"
        triggers_loaded()
        run = run_deployment("sftflow-zombie-served/zombie-probe", timeout=0)
        assert wait_until(out.exists, timeout_s=60, backoff=Backoff(0.3, 1.0)), \
            "the served run did not start"
        assert out.read_text() == "30"  # the flow process got sftflow's heartbeat
        assert wait_until(lambda: _heartbeats(api_url, str(run.id)), timeout_s=30,
                          backoff=Backoff(0.3, 1.0)), "no heartbeat of the run reached the server"
        assert _state(str(run.id)) == "RUNNING"
        os.killpg(server.pid, signal.SIGKILL)  # serve and its flow run's process
        server.wait(10)
        final = wait_until(lambda: _state(str(run.id)) == "CRASHED" or None, timeout_s=45,
                           backoff=Backoff(0.5, 1.0))
        assert final, f"run {run.id} still {_state(str(run.id))} 45 s after serve was killed"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        with get_client(sync_client=True) as client:
            for automation in client.read_automations_by_name(ZOMBIE_AUTOMATION):
                client.delete_automation(automation.id)
            for deployment in deployed():
                client.delete_deployment(deployment.id)
