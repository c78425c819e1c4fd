"""Soak: many rounds of the whole loop with faults injected, invariants checked after each.

    .venv/bin/python bench/soak.py [--rounds 50] [--seed 7] [--prompts 16] [--lease-s 10]
                                   [--postgres] [--no-fork] [--out FILE]

Runs its own local stack (S3, Label Studio, Prefect server; PostgreSQL with ``--postgres``) in a
temporary folder on its own ports, so it can restart the Prefect server, and the OpenAI
contract server (a CONTRACT TEST double of the fine-tuning API, unreachable from here). Each
round: a new prompt file (with bad records) -> ingest -> simulated annotators answer every new
task -> build -> fine-tune (openai backend). Faults, drawn per round independently of each
other from their own seeded generator (``plan_round``):

- ``kill:<failpoint>``: the step runs with ``SFTFLOW_FAILPOINTS`` set to crash (SIGKILL) at
  that failpoint, then runs again (the rerun must finish the work); ``rekill:<failpoint>``: a
  killed build's first rerun is killed too (counted only when the rerun reaches that point);
- ``proxy:<fault>``: a second file's ingest talks to Label Studio through the fault proxy,
  which holds the import's answer past the client's timeout or loses it after the server did
  the work;
- ``prefect-restart``: the Prefect server is stopped and started between steps;
- ``concurrent-build``: two builds at once; ``concurrent-gc``: ``gc --delete`` during a build.

Every step is its own process: forked from a fork server that imported sftflow once (the
step's work without ~4 s of imports), or with ``--no-fork`` the console script in a fresh
interpreter. The S3 locks run with a ``--lease-s`` lease (``SFTFLOW_LOCKS__LEASE_S``, renewed
every third of it), so a killed ingest's lock is taken over after seconds, not the default
minute. The clean rebuild each round's check compares with runs beside that round's build and
fine-tune (the annotations are final by then).

After every round: each valid prompt is exactly once in Label Studio; every quarantined record
has a reason; ``refs/latest`` verifies; the version's rows equal a clean rebuild's from the
same annotations; no fine-tuning job was submitted twice; and every step finally succeeded
(the loop resumes by itself). Writes ``bench/results/soak.json``: faults by kind (counted
when injected: a rekill the rerun did not reach, a proxy fault no request met, are listed
under ``not_injected``), violations,
seconds per round and by phase (``<step>:killed``, ``<step>:after-kill`` with the wait for a
dead holder's lease, ...), the load average per round.
"""

from __future__ import annotations

import argparse
import atexit
import json
import multiprocessing
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "soak.json"
SFTFLOW = str(Path(sys.executable).parent / "sftflow")
TARGETS = {"rounds": 50, "faults": 100, "violations": 0, "minutes": 30}
PROJECT, DATASET, CLEAN = "soak", "soak", "soak-clean"
BASE_MODEL = "gpt-4o-mini-2024-07-18"
API_KEY = "sk-contract-test"

KILLS = {
    "ingest": ["ingest.after-import", "ingest.after-confirm"],
    "build": ["versioning.after-shard", "versioning.after-files", "versioning.after-manifest",
              "versioning.after-ref"],
    "finetune": ["finetune.after-submit", "finetune.after-lineage"],
}


def label_studio_bin() -> Path:
    """label-studio of this checkout, else of the checkout whose virtualenv runs this script
    (a git worktree shares the main checkout's environments)."""
    mine = ROOT / ".venv-labelstudio/bin/label-studio"
    beside = Path(sys.executable).parents[2] / ".venv-labelstudio/bin/label-studio"
    return mine if mine.exists() or not beside.exists() else beside


@dataclass(frozen=True)
class Plan:
    """The faults of one round, drawn independently of each other."""

    prefect_restart: bool  # stop and start the Prefect server before the round's ingest
    ingest_kill: str | None  # kill:<failpoint> of the ingest
    proxy: str | None  # slow_response | lose_response on a second file's import
    build: str  # kill:<failpoint> | concurrent-build | concurrent-gc | plain
    build_rekill: str | None  # also kill the killed build's first rerun here (if it gets there)
    finetune_kill: str | None


def plan_round(rng: random.Random) -> Plan:
    """Expected faults a round: 0.3 + 0.4 + 0.4 + 0.85 + 0.45 * 0.3 (when reached) + 0.55."""
    prefect_restart = rng.random() < 0.3
    ingest_kill = f"kill:{rng.choice(KILLS['ingest'])}" if rng.random() < 0.4 else None
    proxy = rng.choice(["slow_response", "lose_response"]) if rng.random() < 0.4 else None
    r = rng.random()
    build = (f"kill:{rng.choice(KILLS['build'])}" if r < 0.45 else "concurrent-build"
             if r < 0.65 else "concurrent-gc" if r < 0.85 else "plain")
    rekill = (f"kill:{rng.choice(KILLS['build'])}"
              if build.startswith("kill:") and rng.random() < 0.3 else None)
    finetune_kill = f"kill:{rng.choice(KILLS['finetune'])}" if rng.random() < 0.55 else None
    return Plan(prefect_restart, ingest_kill, proxy, build, rekill, finetune_kill)


def stack_env(base: int, folder: Path, postgres: bool, lease_s: float) -> dict[str, str]:
    return {
        "SFTFLOW_STACK__DIR": str(folder),
        "SFTFLOW_STACK__S3_PORT": str(base), "SFTFLOW_STACK__WEED_MASTER_PORT": str(base + 1),
        "SFTFLOW_STACK__WEED_VOLUME_PORT": str(base + 2),
        "SFTFLOW_STACK__WEED_FILER_PORT": str(base + 3),
        "SFTFLOW_STACK__LABEL_STUDIO_PORT": str(base + 4),
        "SFTFLOW_STACK__PREFECT_PORT": str(base + 5),
        "SFTFLOW_STACK__POSTGRES_PORT": str(base + 6),
        "SFTFLOW_STACK__POSTGRES": "true" if postgres else "false",
        "SFTFLOW_STACK__LABEL_STUDIO_BIN": str(label_studio_bin()),
        "SFTFLOW_S3__ENDPOINT_URL": f"http://127.0.0.1:{base}",
        "SFTFLOW_S3__BUCKET": "soak",
        "SFTFLOW_LABELSTUDIO__URL": f"http://127.0.0.1:{base + 4}",
        "SFTFLOW_PREFECT__API_URL": f"http://127.0.0.1:{base + 5}/api",
        "PREFECT_API_URL": f"http://127.0.0.1:{base + 5}/api",
        "SFTFLOW_FINETUNE__BACKEND": "openai",
        "SFTFLOW_FINETUNE__OPENAI_API_KEY": API_KEY,
        "SFTFLOW_LOCKS__LEASE_S": str(lease_s),
        # The soak collects garbage of builds it has just killed: below gc's retention floor.
        "SFTFLOW_DATASETS__GC_MIN_AGE_FLOOR_S": "0",
    }


PRELOAD = ["sftflow.cli", "sftflow.flows.ingest", "sftflow.flows.build_dataset",
           "sftflow.flows.finetune"]


def _cli_child(argv: list[str], env: dict[str, str], out: str, err: str) -> None:
    """``sftflow ARGV`` in this fresh process (forked from the fork server), as the console
    script runs it: its own environment, stdout and stderr to files, atexit handlers run."""
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    code = 1
    try:
        from sftflow.cli import main
        from sftflow.core.settings import get_settings

        get_settings.cache_clear()  # settings come from this step's environment
        sys.argv = ["sftflow", *argv]
        main()
        code = 0
    except SystemExit as ex:
        code = ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported on the step's stderr, as the interpreter would
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()  # what interpreter exit runs (Prefect flushes logs and events)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Runner:
    """Starts ``sftflow`` steps as processes. Default: each step is a new process forked from
    a fork server that imported sftflow once (multiprocessing's ``forkserver``), so a step
    costs its work and not ~4 s of imports; it is still its own process, SIGKILLed at its
    failpoint (exit -9) with nothing shared with the soak or the other steps. ``fork=False``:
    the console script in a fresh interpreter (``subprocess``), as a user runs it."""

    def __init__(self, fork: bool, folder: Path):
        self.fork, self.folder, self.n = fork, folder, 0
        if fork:
            self.ctx = multiprocessing.get_context("forkserver")
            self.ctx.set_forkserver_preload(PRELOAD)

    def start(self, argv: list[str], env: dict[str, str]) -> Any:
        if not self.fork:
            return subprocess.Popen([SFTFLOW, *argv], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        self.n += 1
        out, err = self.folder / f"step-{self.n}.out", self.folder / f"step-{self.n}.err"
        proc = self.ctx.Process(target=_cli_child, args=(argv, env, str(out), str(err)))
        proc.start()
        return proc, argv, out, err

    def wait(self, handle: Any, timeout: float = 900) -> subprocess.CompletedProcess:
        if not self.fork:
            out, err = handle.communicate(timeout=timeout)
            return subprocess.CompletedProcess(handle.args, handle.returncode, out, err)
        proc, argv, out, err = handle
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(argv, timeout)
        res = subprocess.CompletedProcess(argv, proc.exitcode, out.read_text(errors="replace"),
                                          err.read_text(errors="replace"))
        out.unlink()
        err.unlink()
        return res


class Soak:
    def __init__(self, args: argparse.Namespace, folder: Path):
        from sftflow.core.settings import Settings
        from sftflow.infra.stack import LocalStack
        from tests.contract.openai_server import OpenAIContractServer

        self.args = args
        self.rng = random.Random(args.seed)
        self.env = stack_env(args.base_port, folder / "stack", args.postgres, args.lease_s)
        os.environ.update(self.env)
        self.openai = OpenAIContractServer(api_key=API_KEY).__enter__()
        os.environ["SFTFLOW_FINETUNE__OPENAI_BASE_URL"] = self.openai.base_url
        self.env["SFTFLOW_FINETUNE__OPENAI_BASE_URL"] = self.openai.base_url
        self.settings = Settings()
        self.stack = LocalStack(self.settings)
        (folder / "steps").mkdir(parents=True, exist_ok=True)
        self.runner = Runner(not args.no_fork, folder / "steps")
        self.faults: Counter[str] = Counter()
        self.violations: list[dict[str, Any]] = []
        self.valid: set[str] = set()  # prompt_ids of every valid prompt written so far
        self.bad_records = 0
        self.steps: Counter[str] = Counter()
        self.round = 0
        self.fault_rng = random.Random(args.seed)  # the fault plan, apart from the prompts
        self.not_injected: Counter[str] = Counter()
        self.clean: Any = None  # this round's clean rebuild, running beside build and fine-tune
        self.phases: dict[str, float] = {}  # seconds per phase of the current round
        self.round_faults: list[str] = []  # faults injected in the current round
        self.rounds: list[dict[str, Any]] = []  # per round: seconds, faults, phases

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the block's wall time to the current round's phase ``name``."""
        t = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = round(self.phases.get(name, 0.0) + time.monotonic() - t, 2)

    def fault(self, kind: str) -> None:
        self.faults[kind] += 1
        self.round_faults.append(kind)

    # -- plumbing ------------------------------------------------------------------------------
    def clients(self):
        from sftflow.tasks.adapters.clients import Clients

        return Clients(self.settings)

    def start(self, *args: str, failpoint: str | None = None,
              extra_env: dict[str, str] | None = None) -> Any:
        env = {**os.environ, **self.env, **(extra_env or {})}
        if failpoint:
            env["SFTFLOW_FAILPOINTS"] = f"{failpoint}=crash"
        else:
            env.pop("SFTFLOW_FAILPOINTS", None)
        return self.runner.start(list(args), env)

    def cli(self, *args: str, failpoint: str | None = None,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return self.runner.wait(self.start(*args, failpoint=failpoint, extra_env=extra_env))

    def step(self, name: str, argv: list[str], fault: str | None, *,
             rekill: str | None = None) -> None:
        """Run a step (crashing it first at a failpoint when ``fault`` names one, and its first
        rerun too at ``rekill``), then again until it succeeds, at most 3 times: the loop must
        resume by itself."""
        killed = bool(fault and fault.startswith("kill:"))
        if fault and killed:
            with self.phase(f"{name}:killed"):
                res = self.cli(*argv, failpoint=fault.removeprefix("kill:"))
            self.fault(fault)
            if res.returncode != -9:
                self.violate("failpoint did not fire", step=name, fault=fault,
                             rc=res.returncode, err=res.stderr[-400:])
            if rekill:  # a crash during the recovery: counted only when the rerun reaches it
                with self.phase(f"{name}:rekilled"):
                    res = self.cli(*argv, failpoint=rekill.removeprefix("kill:"))
                if res.returncode == -9:
                    self.fault(f"re{rekill}")
                else:
                    self.not_injected[rekill] += 1
        with self.phase(f"{name}:after-kill" if killed else name):
            for attempt in range(3):
                res = self.cli(*argv)
                if res.returncode == 0:
                    self.steps[name] += 1
                    return
                time.sleep(2 * (attempt + 1))
        self.violate("step did not resume", step=name, err=res.stderr[-600:])

    def violate(self, what: str, **detail: Any) -> None:
        self.violations.append({"round": self.round, "what": what, **detail})
        print(f"  VIOLATION round {self.round}: {what} {json.dumps(detail)[:300]}", flush=True)

    # -- a round -------------------------------------------------------------------------------
    def write_prompts(self) -> str:
        from sftflow.tasks.ingest.prompts import prompt_id

        lines, r = [], self.round
        for i in range(self.args.prompts):
            text = f"Round {r}, question {i}: how would you explain {self.rng.random():.6f}?"
            lines.append(json.dumps({"prompt": text}))
            self.valid.add(prompt_id(text))
        bad = [json.dumps({"prompt": ""}), "{not json", json.dumps({"text": "no prompt field"}),
               json.dumps({"prompt": "x" * 200_000})]
        for line in self.rng.sample(bad, 2):
            lines.insert(self.rng.randrange(len(lines)), line)
            self.bad_records += 1
        key = f"prompts/round-{r:03d}.jsonl"
        self.clients().s3.put_bytes(key, ("\n".join(lines) + "\n").encode())
        return key

    def annotate(self) -> None:
        from sftflow.tasks.adapters.labelstudio import find_project

        ls = self.clients().labelstudio
        project = find_project(ls, PROJECT)
        for task in ls.tasks.list(project=project.id, fields="all"):
            if task.annotations:  # total_annotations reads 0 here in Label Studio 1.23
                continue
            prompt = (task.data or {}).get("prompt", "")
            ls.annotations.create(id=task.id, result=[{
                "from_name": "instruction", "to_name": "prompt", "type": "textarea",
                "value": {"text": [f"An answer to: {prompt[:60]} (annotator {task.id % 3})"]}}])

    def run_round(self) -> None:
        plan = plan_round(self.fault_rng)
        with self.phase("prompts"):
            self.write_prompts()
        # ingest
        if plan.prefect_restart:
            self.restart_prefect()
        self.step("ingest", ["ingest", "s3://soak/prompts/", "--project", PROJECT, "--json"],
                  plan.ingest_kill)
        if plan.proxy:
            self.ingest_through_proxy(plan.proxy)
        with self.phase("annotate"):
            self.annotate()
        # The annotations are final for this round: the clean rebuild (the reference the
        # invariant compares with) runs beside the faulted build and fine-tune.
        self.clean = self.start("build", "--project", PROJECT, "--dataset", CLEAN, "--json")
        # build
        build = ["build", "--project", PROJECT, "--dataset", DATASET, "--json"]
        if plan.build == "concurrent-build":
            self.concurrently("concurrent-build", build, build)
        elif plan.build == "concurrent-gc":
            self.concurrently("concurrent-gc", build,
                              ["datasets", "gc", DATASET, "--delete", "--min-age-s", "0"])
        else:
            self.step("build", build, plan.build if plan.build.startswith("kill:") else None,
                      rekill=plan.build_rekill)
        # fine-tune
        self.step("finetune", ["finetune", "--dataset", DATASET, "--backend", "openai",
                               "--base-model", BASE_MODEL, "--min-train-rows", "1",
                               "--deadline", "120", "--poll-interval", "0.5", "--json"],
                  plan.finetune_kill)

    def restart_prefect(self) -> None:
        with self.phase("prefect-restart"):
            self.stack.down(["prefect"])
            self.stack.up(["prefect"])
        self.fault("prefect-restart")

    def concurrently(self, kind: str, a: list[str], b: list[str]) -> None:
        with self.phase(kind):
            procs = [self.start(*argv) for argv in (a, b)]
            for p in procs:
                self.runner.wait(p)
        self.fault(kind)
        self.step("build", a, None)  # whatever happened, a plain build then succeeds

    def ingest_through_proxy(self, kind: str) -> None:
        """A second ingest (of a fresh file) through the fault proxy: the import's answer
        arrives after the client gave up, or is lost after Label Studio did the work."""
        from urllib.parse import urlparse

        from tests.faults.proxy import Fault, FaultProxy

        key = self.write_prompts_extra()
        up = urlparse(self.settings.labelstudio.url)
        with FaultProxy(up.hostname, up.port) as proxy, self.phase(f"ingest:proxy-{kind}"):
            proxy.add(Fault(kind, method="POST", path=r"/api/projects/\d+/import", seconds=6,
                            status=504))
            self.cli("ingest", f"s3://soak/{key}", "--project", PROJECT, "--json",
                     extra_env={"SFTFLOW_LABELSTUDIO__URL": proxy.url,
                                "SFTFLOW_LABELSTUDIO__TIMEOUT_S": "3"})
            if proxy.applied[kind]:  # the import did go through the proxy and met the fault
                self.fault(f"proxy:{kind}")
            else:
                self.not_injected[f"proxy:{kind}"] += 1
        self.step("ingest", ["ingest", f"s3://soak/{key}", "--project", PROJECT, "--json"], None)

    def write_prompts_extra(self) -> str:
        from sftflow.tasks.ingest.prompts import prompt_id

        lines = []
        for i in range(self.args.prompts):
            text = f"Round {self.round}, extra {i}: what is {self.rng.random():.6f} for?"
            lines.append(json.dumps({"prompt": text}))
            self.valid.add(prompt_id(text))
        key = f"prompts-extra/round-{self.round:03d}.jsonl"
        self.clients().s3.put_bytes(key, ("\n".join(lines) + "\n").encode())
        return key

    # -- invariants ----------------------------------------------------------------------------
    def check(self) -> None:
        from sftflow.tasks.adapters.labelstudio import find_project
        from sftflow.tasks.versions.read import load_manifest

        c = self.clients()
        project = find_project(c.labelstudio, PROJECT)
        per_id = Counter((t.data or {}).get("prompt_id")
                         for t in c.labelstudio.tasks.list(project=project.id, fields="all"))
        twice = [p for p, n in per_id.items() if n > 1]
        missing = self.valid - set(per_id)
        if twice:
            self.violate("prompt in Label Studio more than once", count=len(twice))
        if missing:
            self.violate("valid prompt missing from Label Studio", count=len(missing))
        for obj in c.s3.list("_sftflow/quarantine/"):
            body = c.s3.get_bytes(obj.key)[0]
            if obj.key.endswith(".jsonl"):
                for line in body.decode(errors="replace").splitlines():
                    if line.strip() and not json.loads(line).get("reason"):
                        self.violate("quarantined record without a reason", key=obj.key)
        try:
            latest = load_manifest(c.s3, DATASET, verify=True)
        except Exception as err:  # noqa: BLE001 - the invariant is that this never fails
            self.violate("refs/latest does not verify", error=str(err)[:300])
            return
        with self.phase("check:clean-build-wait"):
            res = self.runner.wait(self.clean)
            self.clean = None
        if res.returncode != 0:
            self.violate("clean rebuild failed", err=res.stderr[-300:])
            return
        clean = load_manifest(c.s3, CLEAN, verify=False)
        if self.row_hashes(c.s3, latest) != self.row_hashes(c.s3, clean):
            self.violate("version rows differ from a clean rebuild", version=latest.version)
        jobs = Counter((j.get("metadata") or {}).get("sftflow_job")
                       for j in self.openai.state.jobs.values())
        if any(n > 1 for n in jobs.values()):
            self.violate("fine-tuning job submitted twice",
                         jobs={k: n for k, n in jobs.items() if n > 1})

    @staticmethod
    def row_hashes(s3, manifest) -> set[str]:
        import io

        import pyarrow.parquet as pq

        out: set[str] = set()
        for f in manifest.files_of("parquet"):
            data, _ = s3.get_bytes(manifest.key(f.path))
            out.update(pq.read_table(io.BytesIO(data), columns=["row_hash"]).column(0).to_pylist())
        return out

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        print(f"stack up in {self.env['SFTFLOW_STACK__DIR']} ...", flush=True)
        self.stack.up()
        self.clients().s3.ensure_bucket()
        per_round = []
        for number in range(1, self.args.rounds + 1):
            if (time.monotonic() - started) / 60 > self.args.max_minutes:
                print(f"stopping after {number - 1} rounds: --max-minutes reached", flush=True)
                break
            self.round = number
            self.phases, self.round_faults = {}, []
            t = time.monotonic()
            try:
                self.run_round()
                with self.phase("check"):
                    self.check()
            except Exception as err:  # noqa: BLE001 - a harness error is a finding, not a crash
                self.violate("round raised", error=f"{type(err).__name__}: {err}"[:400])
            if self.clean is not None:  # the round raised before its check
                self.runner.wait(self.clean)
                self.clean = None
            per_round.append(round(time.monotonic() - t, 1))
            self.rounds.append({"round": number, "seconds": per_round[-1],
                                "faults": self.round_faults, "phases": self.phases,
                                "load_avg_1m": round(os.getloadavg()[0], 2)})
            print(f"round {self.round}: {per_round[-1]} s, faults {self.round_faults}, so far "
                  f"{sum(self.faults.values())}, violations {len(self.violations)}; "
                  f"{json.dumps(self.phases)}", flush=True)
        minutes = (time.monotonic() - started) / 60
        return {
            "rounds": self.round, "rounds_asked": self.args.rounds, "seed": self.args.seed,
            "postgres": self.args.postgres, "lock_lease_s": self.args.lease_s,
            "steps_forked": not self.args.no_fork,
            "prompts_per_round": self.args.prompts, "valid_prompts": len(self.valid),
            "bad_records": self.bad_records,
            "faults": sum(self.faults.values()), "faults_by_kind": dict(sorted(self.faults.items())),
            "not_injected": dict(sorted(self.not_injected.items())),
            "violations": len(self.violations), "violation_details": self.violations[:50],
            "steps_completed": dict(self.steps), "minutes": round(minutes, 1),
            "seconds_per_round": per_round,
            "seconds_by_phase": phase_totals(self.rounds),
            "round_details": self.rounds,
            "targets": TARGETS,
            "met": {"rounds": self.round >= TARGETS["rounds"],
                    "faults": sum(self.faults.values()) >= TARGETS["faults"],
                    "violations": not self.violations, "minutes": minutes <= TARGETS["minutes"]},
        }

    def close(self) -> None:
        self.stack.down()
        self.openai.__exit__(None, None, None)


def phase_totals(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per phase over all rounds: how many rounds had it, total, mean and max seconds
    (``check`` includes ``check:clean-build``; ``<step>:after-kill`` is the rerun after a kill,
    waits for the dead holder's lease included)."""
    seen: dict[str, list[float]] = defaultdict(list)
    for r in rounds:
        for name, secs in r["phases"].items():
            seen[name].append(secs)
    return {name: {"rounds": len(v), "total": round(sum(v), 1), "mean": round(sum(v) / len(v), 1),
                   "max": round(max(v), 1)}
            for name, v in sorted(seen.items(), key=lambda kv: -sum(kv[1]))}


def main() -> None:
    # SIGTERM (a stopped run) exits through atexit, which stops the soak's own stack.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--prompts", type=int, default=16, help="new valid prompts per round")
    ap.add_argument("--base-port", type=int, default=20100)
    ap.add_argument("--postgres", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the stack folder afterwards")
    ap.add_argument("--max-minutes", type=float, default=60.0,
                    help="start no new round after this many minutes")
    ap.add_argument("--lease-s", type=float, default=10.0,
                    help="lease of the S3 locks (SFTFLOW_LOCKS__LEASE_S; renewed every third): "
                    "how long a killed step's lock blocks the rerun")
    ap.add_argument("--no-fork", action="store_true",
                    help="run every step as the console script in a fresh interpreter instead "
                    "of forking it from a fork server that imported sftflow once (~4 s more a step)")
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help="where to write the results (default: bench/results/soak.json)")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="sftflow-soak-"))
    load = os.getloadavg()
    soak = Soak(args, folder)
    try:
        result = soak.run()
    finally:
        soak.close()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                         "load_avg_1m_at_start": load[0], "load_avg_1m_at_end": os.getloadavg()[0]}
    result["when"] = datetime.now(UTC).isoformat(timespec="seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items()
                      if k not in ("seconds_per_round", "round_details")}, indent=2))


if __name__ == "__main__":
    main()
