"""The local stack's service definitions (``infra/stack.py``): SeaweedFS (``s3``), Label Studio
and the Prefect server, plus ``postgres`` (:mod:`sftflow.infra.postgres`) with ``stack.postgres``.

:class:`StackServices` builds each service's :class:`ServiceSpec` (command line, environment,
ports, health check, start and stop hooks), the files the services read at start, and their
health checks. :class:`sftflow.infra.stack.LocalStack` starts, inspects and stops them.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterable
from pathlib import Path

import httpx

from sftflow.core.errors import ServiceUnavailable, SftflowError
from sftflow.infra.postgres import PG_DATABASES, PG_ROLE, PostgresService
from sftflow.infra.processes import ServiceSpec, _bin, weed_grpc_port
from sftflow.infra.templates import labelstudio_template, prefect_template, seed

#: The services of the default (SQLite) stack.
SERVICES = ("s3", "labelstudio", "prefect")
#: Every service a stack may run; ``postgres`` only with ``stack.postgres`` on. Start order.
ALL_SERVICES = ("postgres", *SERVICES)

# -- Prefect: concurrency leases that outlive a restart (issue #18 item 2) ----------------------
#: Deployment concurrency keeps each run's slot in the database (the limit's ``active_slots``)
#: and the lease that frees it in the server's lease storage. Prefect's default storage is the
#: server's memory: a restart forgets the leases but not the slots, so a run that dies after a
#: restart keeps its slot forever (every later run waits in ``AwaitingConcurrencySlot``), and a
#: live run's next renewal gets 410 and the engine cancels it. On disk (``PREFECT_HOME``, next
#: to the SQLite database) the leases survive: a live run renews, a dead run's lease expires
#: and the server's repossessor frees its slot. One server process per ``PREFECT_HOME``; a
#: server replicated over several hosts needs a shared storage (``prefect-redis``).
PREFECT_LEASES_ENV = {
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
}

#: The event persister writes the events it received every 0.25 s (Prefect's default: 5 s; it
#: writes nothing when none came). A build marks its version announced only once the API
#: returns its event (``tasks/build/publish.py``), so the default added 0-5 s to every build's
#: wall time, and 1 s still 0.1-1.2 s: the publish stage of twenty incremental builds of one
#: 55k-task project took 0.48-1.67 s (bench/results/incremental.json, session 16).
PREFECT_EVENTS_ENV = {"PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.25"}


class StackServices(PostgresService):
    """The services' specs, start-time files and health checks, for ``settings.stack``."""

    # -- paths ---------------------------------------------------------------------------------
    def log_path(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    # -- service definitions -------------------------------------------------------------------
    def specs(self) -> dict[str, ServiceSpec]:
        return {
            "postgres": self._postgres_spec(),
            "s3": self._s3_spec(),
            "labelstudio": self._labelstudio_spec(),
            "prefect": self._prefect_spec(),
        }

    def _s3_spec(self) -> ServiceSpec:
        c, host = self.cfg, self.cfg.host
        weed_ports = [c.s3_port, c.weed_master_port, c.weed_volume_port, c.weed_filer_port]
        s3_ports = weed_ports + [weed_grpc_port(p) for p in weed_ports]
        return ServiceSpec(
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
        )

    def _labelstudio_spec(self) -> ServiceSpec:
        c, host = self.cfg, self.cfg.host
        ls_db = {}
        if c.postgres:  # the password is added by _secret_env
            ls_db = {"DJANGO_DB": "postgresql", "POSTGRE_NAME": PG_DATABASES["labelstudio"],
                     "POSTGRE_USER": PG_ROLE, "POSTGRE_HOST": host,
                     "POSTGRE_PORT": str(c.postgres_port)}
        env = {
            "LABEL_STUDIO_BASE_DATA_DIR": str(self._data_path("labelstudio")),
            # Taken only when the first organization is created (empty database).
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            # Local stack only: webhooks and S3 endpoints on loopback must be allowed.
            "SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            # Nothing leaves the machine: Label Studio otherwise reports every API call
            # (with the user's e-mail) from a new thread and errors to its Sentry; about
            # half its CPU per request here, spent on calls that cannot reach the internet.
            "COLLECT_ANALYTICS": "false", "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
            "DJANGO_SETTINGS_MODULE": "sftflow_labelstudio_settings",
            "PYTHONPATH": str(self.dir / "labelstudio-settings"),
            **ls_db,
        }
        return ServiceSpec(
            name="labelstudio",
            argv=[
                "{label-studio}", "start", "--no-browser", "--port", str(c.label_studio_port),
                "--internal-host", host,
            ],  # the admin's credentials go in the environment (_secret_env), not argv
            env=env,
            url=f"http://{host}:{c.label_studio_port}",
            ports=[c.label_studio_port],
            health=self._labelstudio_health,
            before_start=lambda: (self._write_labelstudio_settings(),
                                  self._seed_labelstudio_db(env)),
        )

    def _prefect_spec(self) -> ServiceSpec:
        c, host = self.cfg, self.cfg.host
        immediate = not c.postgres and c.prefect_sqlite_immediate
        launcher = ["{python}", str(self._prefect_launcher_path())] if immediate else ["{prefect}"]
        return ServiceSpec(
            name="prefect",
            argv=[*launcher, "server", "start", "--host", host, "--port", str(c.prefect_port)],
            env={  # with stack.postgres, the database URL is added by _secret_env
                "PREFECT_HOME": str(self._data_path("prefect")),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_UI_API_URL": f"http://{host}:{c.prefect_port}/api",
                **PREFECT_LEASES_ENV,
                **PREFECT_EVENTS_ENV,
            },
            url=f"http://{host}:{c.prefect_port}",
            ports=[c.prefect_port],
            health=self._prefect_health,
            before_start=lambda: (self._write_prefect_launcher() if immediate else None,
                                  self._seed_prefect_db()),
        )

    # -- migrated templates (infra/templates.py): SQLite only ---------------------------------
    def _uses_templates(self) -> bool:
        return self.cfg.templates and not self.cfg.postgres

    def _seed_labelstudio_db(self, env: dict[str, str]) -> None:
        target = self._data_path("labelstudio") / "label_studio.sqlite3"
        if not self._uses_templates() or target.exists():
            return
        python = Path(self._resolve_argv(["{label-studio}"])[0]).parent / "python"
        template = labelstudio_template(self.cfg.template_dir, python, env)
        if template is not None:
            seed(template, target)

    def _seed_prefect_db(self) -> None:
        target = self._data_path("prefect") / "prefect.db"
        if not self._uses_templates() or target.exists():
            return
        template = prefect_template(self.cfg.template_dir, self._resolve_argv(["{prefect}"])[0])
        if template is not None:
            seed(template, target)

    def _data_path(self, name: str) -> Path:
        return self.dir / "data" / name

    def _resolve_argv(self, argv: list[str]) -> list[str]:
        subs = {
            "{weed}": lambda: _bin("weed"),
            "{label-studio}": lambda: _bin("label-studio", self.cfg.label_studio_bin),
            "{prefect}": lambda: _bin("prefect"),
            "{python}": lambda: str(Path(_bin("prefect")).parent / "python"),
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
            # One database connection per keep-alive client connection, not one per request:
            # Django's default (0) opens one for every request, which on PostgreSQL forks a
            # backend each time (19 ms of PostgreSQL CPU and 10 ms of Label Studio's a
            # request). Health checks drop one that a database restart broke.
            "DATABASES['default']['CONN_MAX_AGE'] = 300\n"
            "DATABASES['default']['CONN_HEALTH_CHECKS'] = True\n"
            "if DATABASES['default']['ENGINE'].endswith('sqlite3'):\n"
            "    DATABASES['default']['OPTIONS'] = {\n"
            "        'timeout': 30,\n"
            "        'transaction_mode': 'IMMEDIATE',\n"
            "        'init_command': 'PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;',\n"
            "    }\n\n"
            # `label-studio start` runs Django's development server, which serves each client
            # connection in a thread of its own and never closes that thread's database
            # connection: it would stay open until garbage collection. Close it when the
            # client's socket closes, as Django's own threaded test server does.
            "from django.core.management.commands import runserver as _runserver\n"
            "from django.core.servers.basehttp import WSGIServer as _WSGIServer\n"
            "from django.db import connections as _connections\n\n\n"
            "class _ClosingWSGIServer(_WSGIServer):\n"
            "    def close_request(self, request):\n"
            "        _connections.close_all()\n"
            "        super().close_request(request)\n\n\n"
            "_runserver.Command.server_cls = _ClosingWSGIServer\n"
        )

    def _prefect_launcher_path(self) -> Path:
        return self.dir / "prefect-sqlite" / "sftflow_prefect_server.py"

    def _write_prefect_launcher(self) -> None:
        # Prefect 3.8.8 on SQLite opens most write transactions DEFERRED (IMMEDIATE only for
        # state changes through the API). Under WAL, a deferred transaction that has read and
        # then writes after another connection committed fails at once with "database is
        # locked": its snapshot is stale, so busy_timeout never applies (creating a flow run
        # with its first state does exactly that). No Prefect setting changes the BEGIN mode,
        # so the server starts through this launcher, which makes every transaction IMMEDIATE:
        # writers queue on the lock (busy_timeout 60 s) instead of failing
        # (bench/prefect_db_load.py measures both).
        path = self._prefect_launcher_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            '"""Written by sftflow (infra/services.py): `prefect server start` with every SQLite\n'
            'transaction BEGIN IMMEDIATE."""\n'
            "import sys\n\n"
            "from prefect.server.database import configurations\n\n"
            "_begin = configurations.AioSqliteConfiguration.begin_transaction\n\n\n"
            "def _immediate(self, session, with_for_update=False):\n"
            "    return _begin(self, session, with_for_update=True)\n\n\n"
            "configurations.AioSqliteConfiguration.begin_transaction = _immediate\n\n"
            "from prefect.cli import app  # noqa: E402\n\n"
            "sys.exit(app())\n"
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

    def _s3_ping(self) -> None:
        from sftflow.tasks.adapters.s3 import build_s3

        build_s3(self.settings.s3.model_copy(update={"max_attempts": 1})).ping()

