"""Shared fixtures: the real local stack (reused when already running; one per run under
pytest-xdist), a fresh bucket per test, a Label Studio client, a Prefect test harness (one per
worker), and the shared data folder."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sftflow.core.settings import Settings

SHARED_DATA = Path(os.environ.get("SFTFLOW_SHARED_DATA", Path(__file__).parents[1] / ".." / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """xdist worker, --dist loadgroup: the group of each test marked ``xdist_group`` reaches the
    controller as a suffix of its node id (``...::test@group``). pytest-xdist 3.8 writes it to
    an attribute that pytest 9.2 no longer reads (pytest-xdist issue #1386), and the marks are
    then silently ignored; this writes it to the node id as xdist's fix does (a no-op once the
    suffix is there)."""
    if not (hasattr(config, "workerinput") and config.getvalue("loadgroup")):
        return
    try:
        from _pytest.nodeid import NodeId  # pytest >= 9.2; before, xdist's own write works
    except ImportError:
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(groups)
        if groups and not item.nodeid.endswith(suffix):
            node = item._id  # the suffix goes on the last name, so str() gives "...[params]@group"
            last = node.names[-1] + (f"[{node.params}]" if node.params is not None else "")
            item._id = NodeId(path=node.path, names=(*node.names[:-1], last + suffix))


# -- the local stack: one per run --------------------------------------------------------------
# Serial (`-p no:xdist`, `-n 0`): the session fixture `stack` starts what is missing and stops
# what it started. Under pytest-xdist the controller (the process that runs no tests) brings
# the stack up once, in a thread while the workers start and run the tests that need no
# service, and stops what the run started once they have all finished; the workers wait for
# it and only reuse it. A worker that still finds a service missing (a run
# whose -m leaves the integration tests out, a service that died) starts it under a file lock
# and records it for the controller to stop.

_RUN = pytest.StashKey["_StackRun"]()
_WORKER_KEY = "sftflow_stack"  # in each worker's `workerinput`: {"dir": ...}


class _StackRun:
    """The controller's side: what the run started, and where workers record what they did.

    The controller starts the stack in a thread while the workers start, collect and run the
    tests that need no service (about a minute on 2 cores: PostgreSQL's initdb and Label
    Studio's migrations). It writes ``ready.json`` (``{"error": ...}``) when the stack is up or
    failed; a worker's ``stack`` fixture waits for that file before it looks at a service."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.dir = Path(tempfile.mkdtemp(prefix="sftflow-stack-run-"))
        self.started: list[str] = []
        self.error: str | None = None
        self.message: str | None = None
        self._thread: threading.Thread | None = None

    @property
    def ready_file(self) -> Path:
        return self.dir / "ready.json"

    def start(self, integration: bool) -> None:
        """Bring the stack up in the background (or, without integration tests, say ready)."""
        if not integration:
            self._ready()
            return
        self._thread = threading.Thread(target=self.up, name="sftflow-stack-up", daemon=True)
        self._thread.start()

    def _ready(self) -> None:
        tmp = self.dir / "ready.json.tmp"
        tmp.write_text(json.dumps({"error": self.error}))
        tmp.replace(self.ready_file)

    def up(self) -> None:
        from sftflow.infra.stack import LocalStack

        local = LocalStack(self.settings)
        t0 = time.monotonic()
        try:
            missing = _missing(local)
            if missing:
                local.up(missing)
        except Exception as err:  # noqa: BLE001 - every test that needs the stack reports it
            self.error = f"{type(err).__name__}: {err}"
        finally:
            self.started = list(local.started)
            self._ready()
        if self.started or self.error:
            self.message = (f"sftflow stack for the run: started {', '.join(self.started) or 'nothing'}"
                            f" in {time.monotonic() - t0:.0f} s{f'; {self.error}' if self.error else ''}"
                            " (in the background while the workers started)")

    def down(self) -> None:
        from sftflow.infra.stack import LocalStack

        if self._thread is not None:  # a run interrupted while the stack was still starting
            self._thread.join(timeout=self.settings.stack.health_timeout_s + 60)
        names = set(self.started)
        for record in self.dir.glob("started-*.json"):
            names.update(json.loads(record.read_text()))
        if names:
            LocalStack(self.settings).down(names)
        shutil.rmtree(self.dir, ignore_errors=True)


def _await_controller_stack(run_dir: Path, timeout_s: float) -> dict:
    """A worker: the controller's ``ready.json`` once it is written (the stack up or failed)."""
    from sftflow.tasks.runtime.polling import Backoff, wait_until

    ready = run_dir / "ready.json"
    found = wait_until(ready.exists, timeout_s=timeout_s, backoff=Backoff(0.2, 1.0))
    if not found:
        raise RuntimeError(f"the local stack did not come up within {timeout_s:.0f} s "
                           f"(the xdist controller wrote no {ready})")
    return json.loads(ready.read_text())


def _missing(local) -> list[str]:
    """The stack's services that are not healthy now (postgres too when the setting is on)."""
    return [s.name for s in local.status(list(local.services)) if not s.healthy]


def _runs_integration_tests(config: pytest.Config) -> bool:
    """Whether ``-m`` keeps tests marked ``integration`` (no ``-m``, or one we cannot read: yes)."""
    expr = config.option.markexpr
    if not expr:
        return True
    try:
        from _pytest.mark.expression import Expression

        return Expression.compile(expr).evaluate(lambda name, **_: name == "integration")
    except Exception:  # noqa: BLE001 - a private API: when in doubt, start the stack
        return True


def pytest_sessionstart(session: pytest.Session) -> None:
    """xdist controller only: start the stack in the background (xdist starts the workers in
    its own pytest_sessionstart, which runs last)."""
    config = session.config
    if hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("dsession"):
        return  # a worker, or a serial run: the `stack` fixture does it
    run = config.stash[_RUN] = _StackRun(Settings())
    run.start(_runs_integration_tests(config))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist controller: tell each worker where the run records what workers start."""
    run = node.config.stash[_RUN]
    node.workerinput[_WORKER_KEY] = {"dir": str(run.dir)}


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    run = config.stash.get(_RUN, None)
    if run is not None and run.message:
        terminalreporter.write_line(run.message)


def pytest_unconfigure(config: pytest.Config) -> None:
    """xdist controller: stop what the run started, after every worker has ended."""
    run = config.stash.get(_RUN, None)
    if run is not None:
        run.down()


@contextlib.contextmanager
def _stack_lock(local) -> Iterator[None]:
    """One worker at a time checks and starts services (a second `up` would find the ports
    taken by the first)."""
    (local.dir / "pids").mkdir(parents=True, exist_ok=True)
    with open(local.dir / "pids" / "tests-up.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def stack(settings: Settings, pytestconfig: pytest.Config) -> Iterator[Settings]:
    """S3, Label Studio and the Prefect server, healthy. Reuses a running stack; stops only
    what it started (serial), or leaves that to the xdist controller (in a worker).
    (Most Prefect tests use the harness; the crash tests need a real server.)"""
    from sftflow.infra.stack import LocalStack

    local = LocalStack(settings)
    shared = getattr(pytestconfig, "workerinput", {}).get(_WORKER_KEY)
    if shared is None:  # serial run: this process owns what it starts
        missing = _missing(local)  # with SFTFLOW_STACK__POSTGRES=true, postgres too
        if missing:
            local.up(missing)  # reuses a running-but-slow service; starts only what is not running
        yield settings
        if local.started:
            local.down(local.started)
        return
    ready = _await_controller_stack(Path(shared["dir"]), settings.stack.health_timeout_s + 60)
    if ready["error"]:
        raise RuntimeError(f"the local stack did not start for this run: {ready['error']}")
    with _stack_lock(local):
        try:
            missing = _missing(local)
            if missing:
                local.up(missing)
        finally:
            if local.started:  # for the controller to stop at the end of the run
                worker = pytestconfig.workerinput["workerid"]
                (Path(shared["dir"]) / f"started-{worker}.json").write_text(json.dumps(local.started))
    yield settings


@pytest.fixture()
def s3(stack: Settings):
    """An S3 client bound to a new, empty bucket of its own, deleted afterwards."""
    from sftflow.tasks.adapters.s3 import build_s3

    bucket = f"t-{uuid.uuid4().hex[:12]}"
    client = build_s3(stack.s3.model_copy(update={"bucket": bucket}))
    client.ensure_bucket()
    yield client
    # A bucket is a SeaweedFS collection holding volumes: free them for the next tests.
    client.delete(o.key for o in client.list(""))
    with contextlib.suppress(Exception):  # not the test's subject: never fail a test here
        client.client.delete_bucket(Bucket=bucket)


@pytest.fixture(scope="session")
def labelstudio(stack: Settings):
    from sftflow.tasks.adapters.labelstudio import build_labelstudio

    return build_labelstudio(stack.labelstudio)


def prefect_template() -> Path:
    """The migrated Prefect SQLite database (infra/templates.py), made once for the machine:
    a test's own Prefect server copies it instead of running the migrations (~9 s of CPU)."""
    from sftflow.infra.processes import _bin
    from sftflow.infra.templates import prefect_template as made

    template = made(Settings().stack.template_dir, _bin("prefect"))
    assert template is not None, "prefect's dist-info not found beside the prefect executable"
    return template


@contextlib.contextmanager
def _harness_database_from_template() -> Iterator[None]:
    """``prefect_test_harness`` makes its SQLite database in a folder of its own (``mkdtemp``);
    this puts a copy of the migrated template there first, so its server skips the migrations."""
    import prefect.testing.utilities as harness

    from sftflow.infra.templates import seed

    template, mkdtemp = prefect_template(), harness.mkdtemp

    def seeded() -> str:
        folder = mkdtemp()
        seed(template, Path(folder) / "prefect-test.db")
        return folder

    harness.mkdtemp = seeded
    try:
        yield
    finally:
        harness.mkdtemp = mkdtemp


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A real, ephemeral Prefect API (runs triggers and automations, not the scheduler)."""
    from prefect.testing.utilities import prefect_test_harness

    # The harness server is a subprocess of this worker and inherits its environment: no
    # telemetry calls to a host this machine cannot reach, no UI files copied at its start.
    # No task-run recorder either: it writes a row for every task run and state from the
    # event stream, which no test reads here (tests read flow runs, artifacts, events and
    # automations), and it was about a fifth of each harness server's CPU (18 -> 14 s over
    # the incremental-rounds test), the harness servers a sixth of the suite's. The stack's
    # Prefect server, which the UI and deployment tests use, keeps it.
    # The event persister flushes as often as the stack's server's does (PREFECT_EVENTS_ENV;
    # Prefect's default is 5 s): a build marks its version announced only once the API returns its event, so
    # the default left every announcing build idle for up to 5 s (test_build_dataset.py,
    # serially: 113 s -> 84-94 s of wall time, the same CPU).
    from sftflow.infra.services import PREFECT_EVENTS_ENV

    quiet = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
             "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false", **PREFECT_EVENTS_ENV}
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        with _harness_database_from_template(), prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
