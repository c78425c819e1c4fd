"""Nemesis: the soak (``bench/soak.py``) with a recorded history and an independent checker.

    .venv/bin/python bench/nemesis.py [--rounds 3] [--seed 7] [--base-port 22500] [--delete-p 0.5]
                                      [--run-deadline-s 180] [--observe-s 0.5] [--out FILE]

The soak's rounds and faults, on a stack of its own (it restarts its Prefect server), plus:

- every ``sftflow`` step the soak runs is recorded as an operation of the history
  (``bench/history/recorder.py``: argv, failpoint, pid, exit code, its ``--json`` answer, start
  and end times), and so are the simulated annotators and task deletions;
- a nemesis step: with ``--delete-p``, an annotated task of an earlier round is deleted from
  Label Studio before the round's builds (so deleted rows must vanish from every reader);
- each round also builds ``soak-scratch`` with ``sftflow build --scratch`` (the reference a
  version is compared with: the same frozen Label Studio state, another code path);
- an observer polls S3, Label Studio, Prefect and the fine-tuning provider every
  ``--observe-s`` on their own APIs, including what no step of the driver did (deployment runs);
- after every round and at the end, ``bench/history/checker.py`` (which imports nothing of
  sftflow) checks the history; each new finding is a violation of the round, with its evidence.

Writes ``--out`` (default ``bench/results/nemesis.json``: the soak's result plus ``history``:
violations per invariant, with evidence, and what was observed), and the last run's history,
gzipped, beside it (``nemesis-history.jsonl.gz``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import soak as base
from bench.history import checker
from bench.history.recorder import Endpoints, History, Observer, load

RESULTS = ROOT / "bench" / "results" / "nemesis.json"
SCRATCH = "soak-scratch"
REFERENCE = "reference build of the soak: checked against, never fine-tuned (by design)"


def cli_json(stdout: str) -> dict[str, Any] | None:
    """The ``--json`` answer of a step: the last JSON object that runs to the end of stdout
    (it is printed indented, after anything else the step wrote there)."""
    lines = stdout.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                got = json.loads("\n".join(lines[i:]))
            except ValueError:
                continue
            return got if isinstance(got, dict) else None
    return None


class RecordingRunner:
    """The soak's ``Runner``, each step recorded in the history when it is waited for."""

    def __init__(self, runner: base.Runner, history: History):
        self.runner, self.history = runner, history
        self.started: dict[int, tuple[float, float, list[str], str | None, int | None]] = {}

    def start(self, argv: list[str], env: dict[str, str]) -> Any:
        t, wall = time.monotonic(), time.time()
        handle = self.runner.start(argv, env)
        pid = handle[0].pid if isinstance(handle, tuple) else handle.pid
        self.started[id(handle)] = (t, wall, list(argv), env.get("SFTFLOW_FAILPOINTS"), pid)
        return handle

    def wait(self, handle: Any, timeout: float = 900) -> Any:
        t, wall, argv, failpoint, pid = self.started.pop(id(handle))
        res, err = None, None
        try:
            res = self.runner.wait(handle, timeout)
            return res
        except Exception as ex:
            err = f"{type(ex).__name__}: {ex}"[:300]
            raise
        finally:
            result = {"pid": pid, "rc": res.returncode if res else None,
                      "json": cli_json(res.stdout) if res and res.returncode == 0 else None}
            self.history.write("op", op="cli", process=f"pid-{pid}", start=t,
                               end=time.monotonic(), start_wall=wall, end_wall=time.time(),
                               ok=bool(res and res.returncode == 0), error=err,
                               data={"argv": argv, "failpoint": failpoint}, result=result)


class Nemesis(base.Soak):
    def __init__(self, args: argparse.Namespace, folder: Path):
        super().__init__(args, folder)
        self.history = History(folder / "history.jsonl")
        self.runner = RecordingRunner(self.runner, self.history)
        self.nemesis_rng = random.Random(args.seed + 1)  # apart from the soak's own draws
        self.observer: Observer | None = None
        self.scratch: Any = None
        self.reported: set[str] = set()
        self.found: dict[str, list[dict[str, Any]]] = {}
        for ds in (base.CLEAN, SCRATCH):
            self.history.note("finetune-skip", dataset=ds, version=None, reason=REFERENCE)

    def endpoints(self) -> Endpoints:
        s = self.settings
        return Endpoints(
            s3_endpoint=s.s3.endpoint_url, s3_key=s.s3.access_key_id.get_secret_value(),
            s3_secret=s.s3.secret_access_key.get_secret_value(), bucket=s.s3.bucket,
            datasets=[base.DATASET, base.CLEAN, SCRATCH], ls_url=s.labelstudio.url,
            ls_token=s.labelstudio.api_key.get_secret_value(), project_title=base.PROJECT,
            prefect_api=s.prefect.api_url, provider_url=self.openai.base_url,
            provider_key=base.API_KEY, datasets_prefix=s.datasets.prefix)

    def run_round(self) -> None:
        if self.observer is None:  # the stack is up by now
            self.observer = Observer(self.history, self.endpoints(), self.args.observe_s).start()
        super().run_round()

    def annotate(self) -> None:
        if self.scratch is not None:  # a round that raised before its check
            self.runner.wait(self.scratch)
            self.scratch = None
        with self.history.op("annotate", round=self.round):
            super().annotate()
        if self.round > 1 and self.nemesis_rng.random() < self.args.delete_p:
            self.delete_task()
        # The reference: a --scratch build of the state the round's builds read (frozen now;
        # the observer has seen it before the builds start, so the history knows what they read).
        self.settle()
        self.scratch = self.start("build", "--project", base.PROJECT, "--dataset", SCRATCH,
                                  "--scratch", "--json")

    def delete_task(self) -> None:
        """The nemesis: an annotated task of an earlier round deleted from Label Studio."""
        from sftflow.tasks.adapters.labelstudio import find_project

        ls = self.clients().labelstudio
        project = find_project(ls, base.PROJECT)
        old = [t for t in ls.tasks.list(project=project.id, fields="all") if t.annotations
               and not str((t.data or {}).get("prompt", "")).startswith(f"Round {self.round},")]
        if not old:
            return
        victim = self.nemesis_rng.choice(sorted(old, key=lambda t: t.id))
        pid = (victim.data or {}).get("prompt_id")
        with self.history.op("delete-task", task_id=victim.id, prompt_id=pid):
            ls.tasks.delete(id=victim.id)
        self.valid.discard(pid)  # no longer expected in Label Studio
        self.fault("delete-task")

    def check(self) -> None:
        try:
            if self.scratch is not None:
                with self.phase("check:scratch-build-wait"):
                    res = self.runner.wait(self.scratch)
                self.scratch = None
                if res.returncode != 0:
                    self.violate("scratch build failed", err=res.stderr[-300:])
            super().check()
        finally:
            with self.phase("check:history"):
                self.check_history(final=False)

    def settle(self) -> None:
        """Wait for two more observer sweeps: the history holds the state after every step."""
        if self.observer is None:
            return
        target = self.observer.sweeps + 2
        deadline = time.monotonic() + 60
        while self.observer.sweeps < target and time.monotonic() < deadline:
            time.sleep(0.1)

    def check_history(self, final: bool) -> None:
        self.settle()
        events = load(self.history.path)
        self.found = checker.check_all(events, datasets=[base.DATASET, base.CLEAN, SCRATCH],
                                       at_wall=time.time(), deadline_s=self.args.run_deadline_s)
        for invariant, violations in self.found.items():
            for v in violations:
                if v["key"] not in self.reported:
                    self.reported.add(v["key"])
                    self.violate(f"history:{invariant}", what_exactly=v["what"],
                                 evidence=v["evidence"], final=final)

    def run(self) -> dict[str, Any]:
        result = super().run()
        if self.scratch is not None:
            self.runner.wait(self.scratch)
            self.scratch = None
        self.check_history(final=True)
        if self.observer is not None:
            self.observer.stop()
        events = load(self.history.path)
        result["violations"] = len(self.violations)
        result["violation_details"] = self.violations[:100]
        result["met"]["violations"] = not self.violations
        result["history"] = {
            "events": len(events), "ops": sum(e["kind"] == "op" for e in events),
            "observations": dict(sorted(Counter(
                e["what"] for e in events if e["kind"] == "obs").items())),
            "observer_sweeps": self.observer.sweeps if self.observer else 0,
            "observer_errors": self.observer.errors if self.observer else 0,
            "violations_by_invariant": {k: len(v) for k, v in self.found.items()},
            "violations_at_end": {k: v[:20] for k, v in self.found.items() if v},
        }
        return result


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--base-port", type=int, default=22500)
    ap.add_argument("--postgres", action="store_true")
    ap.add_argument("--max-minutes", type=float, default=30.0)
    ap.add_argument("--lease-s", type=float, default=10.0)
    ap.add_argument("--no-fork", action="store_true")
    ap.add_argument("--delete-p", type=float, default=0.5,
                    help="chance a round (after the first) deletes an annotated task")
    ap.add_argument("--run-deadline-s", type=float, default=180.0,
                    help="a flow run live longer than this is stuck")
    ap.add_argument("--observe-s", type=float, default=0.5, help="the observer's poll interval")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="sftflow-nemesis-"))
    soak = Nemesis(args, folder)
    try:
        result = soak.run()
    finally:
        if soak.observer is not None:
            soak.observer.stop()
        soak.close()
        history = soak.history.compress()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        kept = args.out.with_name(f"{args.out.stem}-history.jsonl.gz")
        shutil.copyfile(history, kept)
        shutil.rmtree(folder, ignore_errors=True)
    result["history"]["file"] = os.path.relpath(kept, ROOT)
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("rounds", "faults", "faults_by_kind", "violations",
                                             "history")}, indent=2, default=str)[:6000])


if __name__ == "__main__":
    main()
