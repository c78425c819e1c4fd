"""Issue #18 item 2: a Prefect server restart must not leak a deployment's concurrency slot.

The local stack's Prefect server (``infra/services.py``, a stack of this test's own: its own
folder, SQLite database and a port in this suite's range) serves a deployment limited to one
run at a time, as sftflow's are. A run takes the slot; the server is killed (``kill -9``) and
started again on the same database; then the run's process dies (``kill -9``: its process is
gone, it never reports an end). A new run of the deployment must start once the dead run's
lease has expired (the engine renews it for 300 s at a time, the repossessor then frees it).

With leases kept in the server's memory (Prefect's default) the restart forgets the lease
while the database still counts the slot taken: nothing ever frees it, and every later run
waits in ``AwaitingConcurrencySlot`` forever.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sftflow.tasks.runtime.polling import Backoff, wait_until
from tests.infra._slot_holder import DEPLOYMENT, FLOW

# Minutes long (the engine's 300 s lease): `make test-slow` runs them, `make test` does not.
pytestmark = [pytest.mark.integration, pytest.mark.prefect, pytest.mark.slow]

#: This test's own server: in the test stacks' range (tests/infra/test_stack.py), below the
#: ephemeral ports, moved with SFTFLOW_TEST_STACK_BASE like them.
PORT = int(os.environ.get("SFTFLOW_TEST_STACK_BASE", "21100")) + 710
HOLDER = Path(__file__).with_name("_slot_holder.py")
#: The engine renews a deployment's lease for 300 s; the repossessor looks every 15 s.
LEASE_S = 300.0


@pytest.fixture()
def own_prefect(settings, tmp_path):
    from sftflow.infra.stack import LocalStack

    mine = settings.model_copy(update={"stack": settings.stack.model_copy(update={
        "dir": tmp_path / "stack", "postgres": False, "prefect_port": PORT})})
    local = LocalStack(mine)
    local.up(["prefect"], timeout_s=400)
    try:
        yield local
    finally:
        local.down(["prefect"])


def kill_server(local) -> None:
    from sftflow.infra.processes import port_in_use

    rec = local._read_pid("prefect")
    assert rec is not None
    os.killpg(rec.pid, signal.SIGKILL)  # its own process group: the server this test started
    assert wait_until(lambda: local._read_pid("prefect") is None
                      and not port_in_use("127.0.0.1", PORT), timeout_s=60,
                      backoff=Backoff(0.1, 0.5))


class Runner:
    """``prefect.serve`` of the slot-holder deployment, as a process group of this test."""

    def __init__(self, api_url: str, folder: Path, name: str):
        env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(folder / "client"),
               "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
        log = open(folder / f"{name}.log", "ab")  # noqa: SIM115 - the process's, closed with it
        self.proc = subprocess.Popen([sys.executable, str(HOLDER)], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=Path(__file__).parents[2])

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the runner and the run it started
            self.proc.wait(30)


def _deployment(client):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(f"{FLOW}/{DEPLOYMENT}")
    except ObjectNotFound:
        return None


def _state(client, run_id) -> str:
    state = client.read_flow_run(run_id).state
    return f"{state.type.value}/{state.name}" if state else "none"


def _first_run(client, folder: Path):
    """The deployment, and its first run, running and holding the deployment's one slot."""
    dep = wait_until(lambda: _deployment(client), timeout_s=180)
    assert dep and dep.global_concurrency_limit.limit == 1
    first = client.create_flow_run_from_deployment(
        dep.id, parameters={"folder": str(folder), "tag": "first"})
    assert wait_until(lambda: (folder / "first.started").exists(), timeout_s=180), \
        _state(client, first.id)
    assert _state(client, first.id) == "RUNNING/Running"
    assert client.read_deployment(dep.id).global_concurrency_limit.active_slots == 1
    return dep, client.read_flow_run(first.id)


def _slots(client, dep) -> int:
    return client.read_deployment(dep.id).global_concurrency_limit.active_slots


def test_a_run_killed_across_a_server_restart_does_not_keep_the_slot(own_prefect, tmp_path):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    local = own_prefect
    api = f"http://127.0.0.1:{PORT}/api"
    runners = [Runner(api, tmp_path, "runner-1")]
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}), \
                get_client(sync_client=True) as client:
            dep, first = _first_run(client, tmp_path)
            kill_server(local)  # the run holds the slot while the server dies
            local.up(["prefect"], timeout_s=400)  # the restart: same folder, same database
            runners[0].kill()  # the run's process dies after the restart: no end is reported
            killed_at = time.monotonic()

            runners.append(Runner(api, tmp_path, "runner-2"))  # `sftflow serve` again
            second = client.create_flow_run_from_deployment(
                dep.id, parameters={"folder": str(tmp_path), "tag": "second"})
            started = wait_until(lambda: (tmp_path / "second.started").exists(),
                                 timeout_s=LEASE_S + 120, backoff=Backoff(1.0, 5.0))
            waited = time.monotonic() - killed_at
            assert started, (
                f"the next run never started: {_state(client, second.id)} after {waited:.0f} s, "
                f"active slots {_slots(client, dep)} of 1, held by no live run "
                f"(the killed run is {_state(client, first.id)})")
            assert waited < LEASE_S + 60, waited  # the dead run's lease, then the repossessor
            (tmp_path / "second.release").write_text("done")
            assert wait_until(lambda: _state(client, second.id) == "COMPLETED/Completed",
                              timeout_s=120), _state(client, second.id)
            assert wait_until(lambda: _slots(client, dep) == 0, timeout_s=60), _slots(client, dep)
    finally:
        for runner in runners:
            runner.kill()


def test_a_run_in_flight_across_a_server_restart_keeps_its_lease(own_prefect, tmp_path):
    """The engine renews its run's lease every 225 s and cancels the run when the server
    answers 410 (``raise_on_lease_renewal_failure=True``): a forgotten lease would end a live
    run. After the restart the renewal (made here at once, as the engine makes it) succeeds,
    and the run's end frees the slot."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    local = own_prefect
    api = f"http://127.0.0.1:{PORT}/api"
    runner = Runner(api, tmp_path, "runner-1")
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}), \
                get_client(sync_client=True) as client:
            dep, first = _first_run(client, tmp_path)
            lease_id = first.state.state_details.deployment_concurrency_lease_id
            assert lease_id
            kill_server(local)
            local.up(["prefect"], timeout_s=400)
            answer = client.renew_concurrency_lease(lease_id, 300)  # raises on 410
            assert answer.status_code == 204
            assert _slots(client, dep) == 1
            (tmp_path / "first.release").write_text("done")
            assert wait_until(lambda: _state(client, first.id) == "COMPLETED/Completed",
                              timeout_s=120), _state(client, first.id)
            assert wait_until(lambda: _slots(client, dep) == 0, timeout_s=60), _slots(client, dep)
    finally:
        runner.kill()
