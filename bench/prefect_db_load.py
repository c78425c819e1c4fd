"""Load on the Prefect server's database: SQLite (untuned and tuned) against PostgreSQL.

    .venv/bin/python bench/prefect_db_load.py [--seconds 150] [--flow-procs 8] [--tasks 50]
                                              [--profiles sqlite,sqlite-pool1,...] [--base 22300]
                                              [--out bench/results/prefect_db.json]

For each profile it starts a stack of its own (``sftflow stack up prefect`` in a temporary
folder, on ports from ``--base``; the PostgreSQL profile starts ``postgres`` first), drives the
Prefect server for ``--seconds`` and stops it again:

- ``--flow-procs`` processes, each running flows of ``--tasks`` mapped tasks back to back (every
  flow and task run goes Pending -> Running -> Completed);
- a served deployment of the same flow on a 5 s interval schedule (the scheduler, late-runs and
  the runner's polling on top);
- an event process emitting bursts of 200 events (``emit_event``) with a short pause between.

Then it counts, in the server's log since that start (``logs/prefect.log``), the ``database is
locked`` lines, ``OperationalError`` lines, ERROR records (what ``sftflow stack status`` reports
as failing) and 5xx answers, and on the client side the flow runs completed and failed (an
exception out of a flow call). Writes ``bench/results/prefect_db.json``: per profile its
environment, those counts, wall time and the load average.

Profiles (``PROFILES``): ``sqlite`` (Prefect's defaults: WAL, busy_timeout 60 s, deferred
transactions except state changes), ``sqlite-pool1`` (pool size 1 / max overflow 0 settings,
"one writer"), ``sqlite-timeout`` (``PREFECT_SERVER_DATABASE_TIMEOUT`` 60 s), ``sqlite-stack``
(whatever ``infra/services.py`` now gives the SQLite Prefect service), ``postgres``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SFTFLOW = str(Path(sys.executable).parent / "sftflow")

#: profile -> (postgres on?, extra environment of `stack up`, i.e. of the Prefect server)
PROFILES: dict[str, tuple[bool, dict[str, str]]] = {
    "sqlite": (False, {"SFTFLOW_STACK__PREFECT_SQLITE_IMMEDIATE": "false"}),
    "sqlite-pool1": (False, {"SFTFLOW_STACK__PREFECT_SQLITE_IMMEDIATE": "false",
                             "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "1",
                             "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "0"}),
    "sqlite-timeout": (False, {"SFTFLOW_STACK__PREFECT_SQLITE_IMMEDIATE": "false",
                               "PREFECT_SERVER_DATABASE_TIMEOUT": "60"}),
    "sqlite-stack": (False, {}),
    "postgres": (True, {}),
}

#: After the load's seconds, how long a worker may take to end its last flow; then it is killed
#: and its unfinished flow counts as stuck.
GRACE_S = 90
_LOCKED = re.compile(r"database is locked")
_OPERATIONAL = re.compile(r"OperationalError")
_ERROR_RECORD = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| ERROR ")
_HTTP_5XX = re.compile(r'HTTP/1\.[01]" 5\d\d|status[ _]code[=:] ?5\d\d| 5\d\d (Internal|Service)')


# -- the load: workers run as subprocesses of this file ----------------------------------------
def _load_flow():
    from prefect import flow, task

    @task
    def double(i: int) -> int:
        return i * 2

    @flow(name="db-load", log_prints=False, persist_result=False)
    def db_load(n: int = 50) -> int:
        return sum(f.result() for f in double.map(range(n)))

    return db_load


def worker_flows(seconds: float, tasks: int, out: Path) -> dict:
    """Flows back to back until ``seconds`` pass; the counts so far are in ``out`` after each
    flow (a flow stuck past the grace period is killed, and its counts stay)."""
    db_load = _load_flow()
    deadline, counts = time.monotonic() + seconds, {"completed": 0, "failed": 0, "errors": []}
    while time.monotonic() < deadline:
        try:
            assert db_load(tasks) == tasks * (tasks - 1)
            counts["completed"] += 1
        except Exception as err:  # noqa: BLE001 - a client-side failure is what we count
            counts["failed"] += 1
            counts["errors"] = [*counts["errors"], f"{type(err).__name__}: {str(err)[:200]}"][:5]
        out.write_text(json.dumps(counts))
    return counts


def worker_events(seconds: float, burst: int = 200) -> dict:
    from prefect.events import emit_event
    from prefect.events.clients import get_events_client  # noqa: F401 - the worker's client

    deadline, sent, failed = time.monotonic() + seconds, 0, 0
    while time.monotonic() < deadline:
        for i in range(burst):
            try:
                emit_event(event="sftflow.bench.load", resource={
                    "prefect.resource.id": f"sftflow.bench.{i % 20}"}, payload={"i": i})
                sent += 1
            except Exception:  # noqa: BLE001
                failed += 1
        time.sleep(1.0)
    return {"sent": sent, "failed": failed}


def worker_served(seconds: float, tasks: int) -> dict:
    import threading

    from prefect import serve

    db_load = _load_flow()
    dep = db_load.to_deployment(name="db-load-served", interval=5, parameters={"n": tasks})
    # serve() blocks; a timer ends the process after its share of the load.
    threading.Timer(seconds, lambda: os._exit(0)).start()
    serve(dep, limit=4)
    return {}


def run_worker(kind: str, seconds: float, tasks: int, out: Path) -> None:
    fn = {"flows": lambda: worker_flows(seconds, tasks, out), "events": lambda: worker_events(seconds),
          "served": lambda: worker_served(seconds, tasks)}[kind]
    out.write_text(json.dumps(fn()))
    os._exit(0)  # the Prefect clients' background threads would keep the process alive


# -- the stack ---------------------------------------------------------------------------------
def stack_env(folder: Path, base: int, postgres: bool, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SFTFLOW_STACK__"))}
    return {
        **env,
        "SFTFLOW_STACK__DIR": str(folder / "stack"),
        "SFTFLOW_STACK__PREFECT_PORT": str(base),
        "SFTFLOW_STACK__POSTGRES_PORT": str(base + 1),
        "SFTFLOW_STACK__POSTGRES": "true" if postgres else "false",
        "SFTFLOW_PREFECT__API_URL": f"http://127.0.0.1:{base}/api",
        **extra,
    }


def client_env(base: int, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_API_URL": f"http://127.0.0.1:{base}/api", "PREFECT_HOME": str(home),
            "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def sftflow(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([SFTFLOW, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def count_log(text: str) -> dict:
    lines = text.splitlines()
    at = next((i for i, ln in enumerate(lines) if _LOCKED.search(ln)), None)
    # The first lock error's traceback: its Prefect frames say which request and transaction.
    trace = [ln.strip()[:160] for ln in lines[max(0, (at or 0) - 60):(at or 0) + 1]
             if "prefect/server" in ln or _LOCKED.search(ln) or _ERROR_RECORD.match(ln)]
    return {
        "database_is_locked": sum(bool(_LOCKED.search(ln)) for ln in lines),
        "operational_error": sum(bool(_OPERATIONAL.search(ln)) for ln in lines),
        "error_records": sum(bool(_ERROR_RECORD.match(ln)) for ln in lines),
        "http_5xx": sum(bool(_HTTP_5XX.search(ln)) for ln in lines),
        "first_locked_trace": trace[-14:] if at is not None else [],
        "error_contexts": sorted({ln.split("|", 3)[-1].strip()[:120] for ln in lines
                                  if _ERROR_RECORD.match(ln)})[:10],
    }


# -- one profile -------------------------------------------------------------------------------
def run_profile(name: str, base: int, seconds: float, flow_procs: int, tasks: int) -> dict:
    postgres, extra = PROFILES[name]
    folder = Path(tempfile.mkdtemp(prefix=f"sftflow-dbload-{name}-"))
    folder.chmod(0o711)  # the postgres user (we may be root) must reach its data folder
    env = stack_env(folder, base, postgres, extra)
    t0 = time.monotonic()
    up = sftflow(env, "stack", "up", "prefect", "--json", "--timeout", "240")
    if up.returncode != 0:
        sftflow(env, "stack", "down", "--json", timeout=120)
        return {"profile": name, "error": f"stack up failed: {up.stderr[-500:]}"}
    log = folder / "stack" / "logs" / "prefect.log"
    start_offset = log.stat().st_size
    try:
        result = drive(base, folder, seconds, flow_procs, tasks)
        result["load_average_after"] = os.getloadavg()
        time.sleep(5)  # what the services log about the last runs
        text = log.read_bytes()[start_offset:].decode(errors="replace")
        status = sftflow(env, "stack", "status", "prefect", "--json")
        result["stack_status"] = json.loads(status.stdout)["services"][0]["state"] \
            if status.stdout.strip() else f"rc {status.returncode}"
    finally:
        sftflow(env, "stack", "down", "--json", timeout=120)
    shutil.rmtree(folder, ignore_errors=True)
    return {"profile": name, "postgres": postgres, "env": extra, **result,
            "server_log": count_log(text), "wall_s": round(time.monotonic() - t0, 1)}


def drive(base: int, folder: Path, seconds: float, flow_procs: int, tasks: int) -> dict:
    """Start every worker, wait for them (each stops itself after ``seconds``), gather counts."""
    env = client_env(base, folder / "client-home")
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    kinds = [f"flows-{i}" for i in range(flow_procs)] + ["events", "served"]
    t0, load = time.monotonic(), []
    for kind in kinds:
        out = folder / f"{kind}.json"
        argv = [sys.executable, __file__, "--worker", kind.split("-")[0], "--seconds",
                str(seconds), "--tasks", str(tasks), "--worker-out", str(out)]
        with (folder / f"{kind}.err").open("wb") as err:
            procs[kind] = (subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                            stderr=err), out)
    while any(p.poll() is None for p, _ in procs.values()):
        load.append(os.getloadavg()[0])
        if time.monotonic() - t0 > seconds + GRACE_S:
            for p, _ in procs.values():
                if p.poll() is None:
                    p.kill()
        time.sleep(5)
    stuck = [k for k, (p, _) in procs.items() if p.returncode == -9 and k.startswith("flows")]
    results = {k: json.loads(o.read_text()) if o.exists() else {"missing": True,
               "stderr": (folder / f"{k}.err").read_text(errors="replace")[-400:]}
               for k, (_, o) in procs.items()}
    flows = [v for k, v in results.items() if k.startswith("flows")]
    return {
        "load_seconds": round(time.monotonic() - t0, 1),
        "flow_runs_completed": sum(v.get("completed", 0) for v in flows),
        "flow_runs_failed": sum(v.get("failed", 0) for v in flows),
        "flow_workers_stuck": len(stuck),
        "server_flow_runs": server_run_counts(base),
        "task_runs_completed": sum(v.get("completed", 0) for v in flows) * tasks,
        "client_errors": [e for v in flows for e in v.get("errors", [])][:10],
        "workers_missing": [k for k, v in results.items() if v.get("missing") and k != "served"],
        "events_sent": results["events"].get("sent", 0),
        "events_failed": results["events"].get("failed", 0),
        "load_average_mean": round(sum(load) / max(1, len(load)), 2),
        "load_average_max": round(max(load or [0.0]), 2),
    }


def server_run_counts(base: int) -> dict[str, int]:
    """Flow runs by state type, as the server has them (the served deployment's too)."""
    import httpx

    counts = {}
    for state in ("COMPLETED", "FAILED", "CRASHED", "PENDING", "RUNNING"):
        body = {"flow_runs": {"state": {"type": {"any_": [state]}}}}
        resp = httpx.post(f"http://127.0.0.1:{base}/api/flow_runs/count", json=body, timeout=60)
        counts[state.lower()] = resp.json() if resp.status_code == 200 else -1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=150)
    ap.add_argument("--flow-procs", type=int, default=8)
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--profiles", default="sqlite,sqlite-pool1,sqlite-timeout,sqlite-stack,postgres")
    ap.add_argument("--base", type=int, default=22300)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prefect_db.json")
    ap.add_argument("--worker", choices=["flows", "events", "served"])
    ap.add_argument("--worker-out", type=Path)
    args = ap.parse_args()
    if args.worker:
        run_worker(args.worker, args.seconds, args.tasks, args.worker_out)
        return
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = {r["profile"]: r for r in previous.get("runs", [])}
    for i, name in enumerate(args.profiles.split(",")):
        print(f"{name}: {args.seconds:.0f} s of load ...", flush=True)
        runs[name] = run_profile(name, args.base + 10 * i, args.seconds, args.flow_procs, args.tasks)
        runs[name]["when"] = datetime.now(UTC).isoformat(timespec="seconds")
        print(json.dumps({k: runs[name].get(k) for k in (
            "flow_runs_completed", "flow_runs_failed", "server_log", "stack_status")}), flush=True)
        args.out.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "load": {"seconds": args.seconds, "flow_procs": args.flow_procs, "tasks": args.tasks,
                     "event_burst": 200, "served_interval_s": 5},
            "runs": list(runs.values())}, indent=2) + "\n")


if __name__ == "__main__":
    main()
