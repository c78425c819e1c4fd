"""The Prefect server of the SQLite stack under concurrent writers: no "database is locked".

A Prefect server of the test's own (``sftflow stack up prefect`` in a temp folder, on port
22350), on SQLite as the default stack runs it, takes a burst of concurrent flow runs through
its REST API, each with task runs and their state changes, while batches of events come in.
Prefect 3.8.8's deferred SQLite transactions failed under this with
``sqlite3.OperationalError: database is locked`` (ERROR records in its log, so ``stack status``
said "failing" for ten minutes); bench/prefect_db_load.py is the minutes-long version.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

SFTFLOW = str(Path(sys.executable).parent / "sftflow")
PORT = int(os.environ.get("SFTFLOW_TEST_STACK_BASE", "21100")) + 1250  # the test stacks' range
RUNS = 20


def _sftflow(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SFTFLOW, *args], env=env, capture_output=True, text=True,
                          timeout=240, check=False)


async def _one_run(api: httpx.AsyncClient, flow_id: str, tasks: int) -> None:
    async def post(path: str, body: dict) -> dict:
        resp = await api.post(path, json=body)
        resp.raise_for_status()
        return resp.json()

    run = await post("/flow_runs/", {"flow_id": flow_id, "state": {"type": "PENDING"}})
    await post(f"/flow_runs/{run['id']}/set_state", {"state": {"type": "RUNNING"}})
    for i in range(tasks):
        task = await post("/task_runs/", {"flow_run_id": run["id"], "task_key": "burst",
                                          "dynamic_key": str(i), "state": {"type": "PENDING"}})
        for state in ("RUNNING", "COMPLETED"):
            await post(f"/task_runs/{task['id']}/set_state", {"state": {"type": state}})
    await post(f"/flow_runs/{run['id']}/set_state", {"state": {"type": "COMPLETED"}})


async def _events(api: httpx.AsyncClient, batches: int) -> None:
    for b in range(batches):
        now = datetime.now(UTC).isoformat()
        body = [{"id": str(uuid.uuid4()), "occurred": now, "event": "sftflow.test.burst",
                 "resource": {"prefect.resource.id": f"sftflow.test.{b}.{i}"}, "payload": {}}
                for i in range(50)]
        (await api.post("/events", json=body)).raise_for_status()


async def _burst(runs: int, concurrency: int, tasks: int) -> list[str]:
    failures: list[str] = []
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{PORT}/api", timeout=120,
                                 limits=limits) as api:
        flow_id = (await api.post("/flows/", json={"name": "sqlite-burst"})).json()["id"]
        gate = asyncio.Semaphore(concurrency)

        async def guarded(work) -> None:
            async with gate:
                try:
                    await work
                except httpx.HTTPError as err:
                    failures.append(f"{type(err).__name__}: {str(err)[:160]}")

        await asyncio.gather(*(guarded(_one_run(api, flow_id, tasks)) for _ in range(runs)),
                             guarded(_events(api, 40)))
    return failures


def test_concurrent_runs_and_events_on_sqlite_log_no_lock_errors(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
           "SFTFLOW_STACK__DIR": str(tmp_path / "stack"),
           "SFTFLOW_STACK__PREFECT_PORT": str(PORT), "SFTFLOW_STACK__POSTGRES": "false"}
    up = _sftflow(env, "stack", "up", "prefect", "--json", "--timeout", "180")
    assert up.returncode == 0, up.stderr
    log = tmp_path / "stack" / "logs" / "prefect.log"
    try:
        # 20 runs are enough: with DEFERRED transactions (SFTFLOW_STACK__PREFECT_SQLITE_IMMEDIATE
        # =false) 20 of the 21 workloads failed; 60 took three times as long to show the same.
        failures = asyncio.run(_burst(runs=RUNS, concurrency=16, tasks=5))  # + 1 event stream
        status = _sftflow(env, "stack", "status", "prefect", "--json")
    finally:
        _sftflow(env, "stack", "down", "--json")
    text = log.read_text(errors="replace")
    locked = [ln for ln in text.splitlines() if "database is locked" in ln]
    assert not locked, f"{len(locked)} lock errors, first: {locked[0]}"
    # The server answers a failed deferred transaction with a 503 (retryable) and logs nothing.
    assert failures == [], (f"{len(failures)} of {RUNS + 1} workloads ({RUNS} runs, 1 event stream) "
                            f"failed, first: {failures[0]}")
    assert json.loads(status.stdout)["services"][0]["state"] == "healthy", status.stdout
