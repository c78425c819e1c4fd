"""`sftflow stack up | status | down` for real: a second stack on other ports in a temp folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sftflow.infra.processes import _group_members

pytestmark = pytest.mark.integration

SFTFLOW = str(Path(sys.executable).parent / "sftflow")
# Test stacks sit below the kernel's range for outgoing connections (32768-60999 here), with
# SeaweedFS's gRPC ports (HTTP + 10000) too: a client's source port there made weed exit 255 in CI.
# These tests use BASE .. BASE + 306 (test_stack_postgres.py: BASE + 1000 ..); a second checkout
# running its suite on the same machine at the same time moves them with SFTFLOW_TEST_STACK_BASE.
BASE = int(os.environ.get("SFTFLOW_TEST_STACK_BASE", "21100"))
ROOT = Path(__file__).parents[2]


def stack_env(tmp_path: Path, base: int) -> dict[str, str]:
    # A worktree without its own Label Studio venv names one with SFTFLOW_STACK__LABEL_STUDIO_BIN.
    ls_bin = os.environ.get("SFTFLOW_STACK__LABEL_STUDIO_BIN",
                            ROOT / ".venv-labelstudio" / "bin" / "label-studio")
    return {
        **os.environ,
        "SFTFLOW_STACK__DIR": str(tmp_path / "stack"),
        "SFTFLOW_STACK__S3_PORT": str(base),
        "SFTFLOW_STACK__WEED_MASTER_PORT": str(base + 1),
        "SFTFLOW_STACK__WEED_VOLUME_PORT": str(base + 2),
        "SFTFLOW_STACK__WEED_FILER_PORT": str(base + 3),
        "SFTFLOW_STACK__LABEL_STUDIO_PORT": str(base + 4),
        "SFTFLOW_STACK__PREFECT_PORT": str(base + 5),
        "SFTFLOW_STACK__POSTGRES_PORT": str(base + 6),
        "SFTFLOW_STACK__LABEL_STUDIO_BIN": str(ls_bin),
        "SFTFLOW_S3__ENDPOINT_URL": f"http://127.0.0.1:{base}",
        "SFTFLOW_LABELSTUDIO__URL": f"http://127.0.0.1:{base + 4}",
        "SFTFLOW_PREFECT__API_URL": f"http://127.0.0.1:{base + 5}/api",
    }


def stack_settings():
    from sftflow.core.settings import Settings

    return Settings()


def sftflow(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([SFTFLOW, *args], check=False, env=env, capture_output=True, text=True, timeout=timeout)


def session_stack_profile() -> str:
    """The profile the suite's own stack runs on (CI: postgres; default: sqlite)."""
    return "postgres" if stack_settings().stack.postgres else "sqlite"


def check_running_stack(env: dict[str, str], s3_port: int, names: set[str],
                        scratch: Path) -> dict[str, int]:
    """What holds for any running stack: its services healthy and managed, no secret on a
    command line, `up` again reuses the same processes, a second stack folder on the same
    ports is refused naming the port. Returns the services' pids."""
    status = sftflow(env, "stack", "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["healthy"] is True, status.stdout
    services = {s["name"]: s for s in json.loads(status.stdout)["services"]}
    assert set(services) == names
    assert all(s["healthy"] and s["managed"] for s in services.values()), services
    pids = {name: s["pid"] for name, s in services.items()}
    # Secrets are not on any command line (`ps` shows those to every user).
    secrets = [stack_settings().stack.label_studio_password.get_secret_value(),
               stack_settings().labelstudio.api_key.get_secret_value()]
    for pid in pids.values():
        for member in _group_members(pid):
            argv = Path(f"/proc/{member}/cmdline").read_bytes().decode(errors="replace")
            assert not any(secret in argv for secret in secrets), argv

    # `up` again is idempotent: the same processes are reused.
    again = sftflow(env, "stack", "up", "--json")
    assert {s["name"]: s["pid"] for s in json.loads(again.stdout)["services"]} == pids

    # A second stack folder on the same ports: a clear error naming the port.
    other = {**env, "SFTFLOW_STACK__DIR": str(scratch / "other")}
    clash = sftflow(other, "stack", "up", "s3")
    assert clash.returncode == 1 and "Traceback" not in clash.stderr
    assert f"port {s3_port} on 127.0.0.1 is in use" in clash.stderr
    return pids


def test_up_status_down_leaves_nothing_running(tmp_path, stack):
    """The SQLite profile. Each run starts one stack of its own, for the profile the suite's
    stack is not on: when the suite's stack is on SQLite (the default), this checks that one and
    leaves it running (test_stack_postgres.py then starts a PostgreSQL stack of its own, with
    the same up / status / down checks); on CI's PostgreSQL run it starts a SQLite stack."""
    if session_stack_profile() == "sqlite":
        env = {**os.environ, "SFTFLOW_STACK__DIR": str(stack.stack.dir.resolve())}
        check_running_stack(env, stack.stack.s3_port, {"s3", "labelstudio", "prefect"}, tmp_path)
        return
    env = {**stack_env(tmp_path, BASE), "SFTFLOW_STACK__POSTGRES": "false"}
    pids: dict[str, int] = {}
    try:
        up = sftflow(env, "stack", "up", "--json", "--timeout", "180")
        assert up.returncode == 0, up.stderr + (tmp_path / "stack" / "logs").as_posix()
        pids = check_running_stack(env, BASE, {"s3", "labelstudio", "prefect"}, tmp_path)
    finally:
        down = sftflow(env, "stack", "down", "--json", timeout=120)
    check_down(env, down, pids, ["labelstudio", "prefect", "s3"])
    assert not list(Path("/tmp").glob(f"seaweedfs-*-{BASE}.sock"))


def check_down(env: dict[str, str], down: subprocess.CompletedProcess, pids: dict[str, int],
               stopped: list[str]) -> None:
    """`down` stopped every service and its whole process group; status then finds none."""
    assert down.returncode == 0, down.stderr
    assert sorted(json.loads(down.stdout)["stopped"]) == stopped
    for pid in pids.values():
        assert _group_members(pid) == []  # the whole process group is gone
    after = sftflow(env, "stack", "status", "--json")
    assert after.returncode == 1
    assert not any(s["healthy"] or s["pid"] for s in json.loads(after.stdout)["services"])


def test_a_port_held_by_an_outgoing_connection_is_named_before_anything_starts(tmp_path):
    """SeaweedFS's gRPC port (its HTTP port + 10000) taken as a client's source port: `up`
    names it, and why, instead of weed exiting 255 with a panic in its log."""
    base = BASE + 200
    held = base + 1 + 10000  # the master's gRPC port
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
        client.bind(("127.0.0.1", held))
        client.connect(server.getsockname())
        env = stack_env(tmp_path, base)
        up = sftflow(env, "stack", "up", "s3", "--timeout", "60")
    status = sftflow(env, "stack", "status", "s3", "--json")
    assert up.returncode == 1 and "Traceback" not in up.stderr
    assert f"s3: port {held} on 127.0.0.1 is in use" in up.stderr, up.stderr
    assert not (tmp_path / "stack" / "logs" / "s3.log").exists()  # nothing was started
    assert status.returncode == 1 and not json.loads(status.stdout)["services"][0]["pid"]


def test_a_service_exiting_at_start_shows_its_own_error(tmp_path):
    """When a service dies while starting, the error carries its log's error line, so CI output
    says why without the log file. (A stand-in executable that fails as Label Studio would.)"""
    failing = tmp_path / "label-studio"
    failing.write_text("#!/bin/sh\necho 'starting'\necho 'ERROR: the database is locked'\n"
                       "echo 'shutting down'\nexit 3\n")
    failing.chmod(0o755)
    env = {**stack_env(tmp_path, BASE + 300), "SFTFLOW_STACK__LABEL_STUDIO_BIN": str(failing),
           "SFTFLOW_STACK__POSTGRES": "false"}  # on SQLite: no postgres service to start first
    up = sftflow(env, "stack", "up", "labelstudio", "--timeout", "60")
    assert up.returncode == 1 and "Traceback" not in up.stderr
    assert "labelstudio exited with code 3 while starting (ERROR: the database is locked)" \
        in up.stderr, up.stderr


def test_status_says_failing_when_the_prefect_services_log_errors(tmp_path, stack):
    """A Prefect server that answers /api/health but whose scheduler fails is not 'healthy'.
    The real server of the stack answers; its log (in a stack folder of the test's own) holds
    the scheduler failure of issue #13, stamped as if it had just happened."""
    env = {**os.environ, "SFTFLOW_STACK__DIR": str(tmp_path / "stack"),
           "SFTFLOW_STACK__PREFECT_PORT": str(stack.stack.prefect_port)}
    logs = tmp_path / "stack" / "logs"
    logs.mkdir(parents=True)
    failing = (ROOT / "tests" / "tasks" / "data" / "prefect-scheduler-failing.log").read_text()
    now = time.strftime("%H:%M:%S")
    failing = "\n".join(now + line[8:] if line[:2].isdigit() else line
                        for line in failing.splitlines())
    (logs / "prefect.log").write_text("--- sftflow stack up 2026-11-24T06:57:48\n" + failing)

    res = sftflow(env, "stack", "status", "prefect", "--json")
    assert res.returncode == 1, res.stdout + res.stderr
    prefect = json.loads(res.stdout)["services"][0]
    assert prefect["state"] == "failing" and not prefect["healthy"]
    assert "schedule_deployments failing" in prefect["detail"]
    assert "Can't evaluate bulk DML statement" in prefect["detail"]

    (logs / "prefect.log").write_text(failing + "\n--- sftflow stack up 2026-11-24T07:02:24\n")
    res = sftflow(env, "stack", "status", "prefect", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["services"][0]["state"] == "healthy"
