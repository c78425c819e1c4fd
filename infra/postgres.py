"""The local stack's PostgreSQL (``stack.postgres``): Debian's server binaries, run as the
``postgres`` system user when we are root, holding Label Studio's and the Prefect server's
databases. A mixin of :class:`sftflow.infra.stack.LocalStack` (through ``StackServices``); it
uses the stack's ``cfg``, ``dir``, ``log_path`` and ``_data_path``.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from sftflow.core.errors import ServiceUnavailable, SftflowError
from sftflow.core.settings import Settings, StackSettings
from sftflow.infra.processes import ServiceSpec

#: The PostgreSQL role Label Studio and Prefect connect as, and their databases.
PG_ROLE = "sftflow"
PG_DATABASES = {"labelstudio": "labelstudio", "prefect": "prefect"}
#: PostgreSQL refuses to run as root: as root, the server runs as this system user.
PG_SYSTEM_USER = "postgres"


class PostgresService:
    """The ``postgres`` service: its spec, first-start cluster setup, health and databases."""

    settings: Settings
    cfg: StackSettings
    dir: Path

    def _postgres_spec(self) -> ServiceSpec:
        c, host = self.cfg, self.cfg.host
        return ServiceSpec(
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
        )

    def postgres_url(self, service: str, password: str | None = None) -> str:
        """The SQLAlchemy (asyncpg) URL of ``service``'s database; without the password unless
        one is given."""
        auth = PG_ROLE + (f":{quote(password, safe='')}" if password is not None else "")
        return (f"postgresql+asyncpg://{auth}@{self.cfg.host}:{self.cfg.postgres_port}"
                f"/{PG_DATABASES[service]}")

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

