"""`sftflow stack up --postgres` for real: a second stack on other ports, in a temp folder, with
Label Studio and the Prefect server on PostgreSQL (Debian's server binaries)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from sftflow.core.settings import LOCAL_LS_TOKEN, LOCAL_PG_PASSWORD, StackSettings
from sftflow.infra.processes import _group_members
from tests.infra.test_stack import BASE as STACK_BASE
from tests.infra.test_stack import check_down, session_stack_profile, sftflow, stack_env

pytestmark = pytest.mark.integration

BASE = STACK_BASE + 1000  # below the range for outgoing connections, gRPC ports included (test_stack.py)
PG_PORT = BASE + 6
PG_BIN = StackSettings().postgres_bin_dir


def psql(port: int, db: str, sql: str) -> str:
    res = subprocess.run(
        [str(PG_BIN / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
         "-p", str(port), "-U", "sftflow", "-d", db, "-c", sql],
        env={**os.environ, "PGPASSWORD": LOCAL_PG_PASSWORD}, capture_output=True, text=True,
        timeout=30, check=False,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.fixture()
def stack_dir():
    """A folder the ``postgres`` system user can reach (pytest's tmp_path is 0700 root's)."""
    if not (PG_BIN / "postgres").is_file():
        pytest.skip(f"no PostgreSQL server binaries in {PG_BIN}")
    folder = Path(tempfile.mkdtemp(prefix="sftflow-pg-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def check_postgres_stack(env: dict[str, str], services: dict[str, dict], logs: Path) -> None:
    """What holds for a running stack on PostgreSQL: every service healthy and managed, no
    secret on a command line, in a log or in `status --json`; Label Studio's projects and tasks
    and Prefect's flow runs are rows in PostgreSQL; `up` on SQLite is refused."""
    assert set(services) == {"postgres", "s3", "labelstudio", "prefect"}
    assert all(s["healthy"] and s["managed"] for s in services.values()), services
    port = int(env["SFTFLOW_STACK__POSTGRES_PORT"])
    assert services["postgres"]["url"] == f"postgresql://sftflow@127.0.0.1:{port}"

    # No secret on a command line, in a log or in the JSON.
    secrets = [LOCAL_PG_PASSWORD, LOCAL_LS_TOKEN]
    status = sftflow(env, "stack", "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    assert not any(secret in status.stdout for secret in secrets)
    assert {s["name"] for s in json.loads(status.stdout)["services"]} == set(services)
    for service in services.values():
        for member in _group_members(service["pid"]):
            argv = Path(f"/proc/{member}/cmdline").read_bytes().decode(errors="replace")
            assert not any(secret in argv for secret in secrets), argv
    for log in logs.iterdir():
        assert LOCAL_PG_PASSWORD not in log.read_text(errors="replace"), log

    # Label Studio keeps its data in PostgreSQL: the project is a row there, and a task
    # whose text holds U+0000 is refused (SQLite stores it; PostgreSQL's jsonb cannot).
    ls = httpx.Client(base_url=env["SFTFLOW_LABELSTUDIO__URL"], timeout=60,
                      headers={"Authorization": f"Token {LOCAL_LS_TOKEN}"})
    title = f"pg-{uuid.uuid4().hex[:8]}"
    project = ls.post("/api/projects", json={
        "title": title,
        "label_config": "<View><Text name='t' value='$text'/><Choices name='c' toName='t'>"
                        "<Choice value='a'/></Choices></View>"})
    assert project.status_code == 201, project.text
    project_id = project.json()["id"]
    try:
        assert psql(port, "labelstudio", f"SELECT id FROM project WHERE title = '{title}'") == str(project_id)
        nul = ls.post(f"/api/projects/{project_id}/import", json=[{"text": "a\u0000b"}])
        assert nul.status_code >= 500, nul.text
        ok = ls.post(f"/api/projects/{project_id}/import", json=[{"text": "ab"}])
        assert ok.status_code == 201, ok.text
        assert psql(port, "labelstudio", f"SELECT count(*) FROM task WHERE project_id = {project_id}") == "1"
    finally:
        ls.delete(f"/api/projects/{project_id}")

    # The Prefect server's flow runs are rows of the prefect database.
    api = env["SFTFLOW_PREFECT__API_URL"]
    flow = httpx.post(f"{api}/flows/", json={"name": "pg-probe"}, timeout=60)
    assert flow.status_code in (200, 201), flow.text
    run = httpx.post(f"{api}/flow_runs/", json={"flow_id": flow.json()["id"], "name": title},
                     timeout=60)
    assert run.status_code in (200, 201), run.text
    assert psql(port, "prefect", f"SELECT name FROM flow_run WHERE id = '{run.json()['id']}'") == title

    # `up` on SQLite would reuse servers that are on PostgreSQL: refused, nothing started.
    sqlite = sftflow({**env, "SFTFLOW_STACK__POSTGRES": "false"}, "stack", "up", "--json")
    assert sqlite.returncode == 1 and "Traceback" not in sqlite.stderr
    assert "labelstudio runs on postgresql, prefect runs on postgresql, not sqlite" in sqlite.stderr


def test_up_postgres_runs_labelstudio_and_prefect_on_it(stack_dir, stack):
    """Each run starts one stack of its own, for the profile the suite's stack is not on
    (test_stack.py): on CI's PostgreSQL run this checks the suite's stack and leaves it running;
    on the default SQLite run it starts a PostgreSQL stack, checks it, and stops it."""
    if session_stack_profile() == "postgres":
        env = {**os.environ, "SFTFLOW_STACK__DIR": str(stack.stack.dir.resolve()),
               "SFTFLOW_STACK__POSTGRES_PORT": str(stack.stack.postgres_port),
               "SFTFLOW_LABELSTUDIO__URL": stack.labelstudio.url,
               "SFTFLOW_PREFECT__API_URL": stack.prefect.api_url}
        status = sftflow(env, "stack", "status", "--json")
        services = {s["name"]: s for s in json.loads(status.stdout)["services"]}
        check_postgres_stack(env, services, stack.stack.dir.resolve() / "logs")
        return
    env = stack_env(stack_dir, BASE)
    env.pop("SFTFLOW_STACK__POSTGRES", None)  # the flag alone turns it on
    assert env["SFTFLOW_STACK__POSTGRES_PORT"] == str(PG_PORT)
    pids: dict[str, int] = {}
    try:
        t0 = time.monotonic()
        up = sftflow(env, "stack", "up", "--postgres", "--json", "--timeout", "240", timeout=300)
        took = time.monotonic() - t0
        assert up.returncode == 0, up.stderr + str(stack_dir / "stack" / "logs")
        print(f"stack up --postgres (first start, initdb and migrations): {took:.1f}s")
        services = {s["name"]: s for s in json.loads(up.stdout)["services"]}
        pids = {name: s["pid"] for name, s in services.items()}
        assert not any(secret in up.stdout for secret in (LOCAL_PG_PASSWORD, LOCAL_LS_TOKEN))
        check_postgres_stack(env, services,  # status lists postgres without the setting
                             stack_dir / "stack" / "logs")
    finally:
        down = sftflow(env, "stack", "down", "--json", timeout=180)
    check_down(env, down, pids, ["labelstudio", "postgres", "prefect", "s3"])
    assert not list((stack_dir / "stack" / "pgsocket").iterdir())  # socket and its lock
    assert "database system is shut down" in (stack_dir / "stack" / "logs" / "postgres.log").read_text()
