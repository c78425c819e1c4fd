"""The stack's Label Studio keeps one database connection per client connection, not one per
request, and closes it when the client goes.

Django's default opens a database connection for every request; on PostgreSQL that forks a
backend each time (19 ms of PostgreSQL's CPU and 10 ms of Label Studio's per request, measured
on the stack). The stack's settings keep connections (``CONN_MAX_AGE``), and because the
development server `label-studio start` runs serves each client connection in a thread that
never closes its database connection, they also close it when the client's socket closes:
without that, every client that came and went left a connection open until garbage collection
(42 idle PostgreSQL backends after one test module). Either profile: a PostgreSQL connection
is a TCP socket to its port, a SQLite one an open handle on the database file. The Label Studio
is the test's own (its own folder and port, on the suite's database), so that no other test's
requests move the count.
"""

from __future__ import annotations

import os
import shutil

import httpx
import psutil
import pytest

from sftflow.core.settings import Settings
from sftflow.tasks.runtime.polling import Backoff, wait_until

pytestmark = pytest.mark.integration

#: This test's Label Studio port, in the test stacks' range (see tests/infra/test_stack.py).
PORT = int(os.environ.get("SFTFLOW_TEST_STACK_BASE", "21100")) + 640


@pytest.fixture()
def own_labelstudio(stack: Settings, tmp_path):
    from sftflow.infra.stack import LocalStack

    mine = stack.model_copy(update={
        "stack": stack.stack.model_copy(update={"dir": tmp_path / "stack",
                                                "label_studio_port": PORT}),
        "labelstudio": stack.labelstudio.model_copy(update={"url": f"http://127.0.0.1:{PORT}"}),
    })
    local = LocalStack(mine)
    if stack.stack.postgres:  # the suite's PostgreSQL, which `up` then finds running
        (local.dir / "pids").mkdir(parents=True)
        shutil.copy(LocalStack(stack).dir / "pids" / "postgres.json", local.dir / "pids")
    local.up(["labelstudio"], timeout_s=400)
    try:
        (status,) = local.status(["labelstudio"])
        assert status.healthy and status.pid, status
        yield mine, psutil.Process(status.pid)
    finally:
        local.down(["labelstudio"])


def _db_connections(ls: psutil.Process, settings: Settings) -> int:
    stack = settings.stack
    if stack.postgres:
        return sum(1 for c in ls.net_connections(kind="tcp")
                   if c.raddr and c.raddr.port == stack.postgres_port)
    return sum(1 for f in ls.open_files() if f.path.endswith("label_studio.sqlite3"))


def _steady(ls: psutil.Process, settings: Settings) -> int:
    """The count once it has held for a second (a health check's connection may be closing)."""
    seen: list[int] = []

    def held() -> bool:
        seen.append(_db_connections(ls, settings))
        return len(seen) > 5 and len(set(seen[-6:])) == 1

    assert wait_until(held, timeout_s=20, backoff=Backoff(0.2, 0.2)), seen
    return seen[-1]


def _settle(ls: psutil.Process, settings: Settings, want: int) -> int:
    """The count once it equals ``want`` (or what it is after 10 s)."""
    wait_until(lambda: _db_connections(ls, settings) == want, timeout_s=10,
               backoff=Backoff(0.05, 0.5))
    return _db_connections(ls, settings)


def test_one_database_connection_per_client_connection_closed_when_the_client_goes(
        own_labelstudio):
    stack, ls = own_labelstudio
    key = stack.labelstudio.api_key.get_secret_value()
    url = f"{stack.labelstudio.url.rstrip('/')}/api/projects/?page_size=1"
    before = _steady(ls, stack)

    with httpx.Client(headers={"Authorization": f"Token {key}"}) as client:  # keep-alive
        for _ in range(5):
            client.get(url).raise_for_status()
        # the client's one connection holds one database connection between its requests
        assert _settle(ls, stack, before + 1) == before + 1
    assert _settle(ls, stack, before) == before  # closed with the client's socket

    for _ in range(5):  # a client connection per request: none is left behind
        httpx.get(url, headers={"Authorization": f"Token {key}", "Connection": "close"}
                  ).raise_for_status()
    assert _settle(ls, stack, before) == before
