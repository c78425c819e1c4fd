"""``sftflow demo``: the whole loop on the project's own sample, against the local stack.

1. builds a tiny Llama-style model locally (no hub) and registers the ``train-trl`` deployment
   on a process work pool, with a worker that this demo starts and stops by pid;
2. splits ``sample_prompts.jsonl`` into two prompt files, one per round (``sample_round``);
3. turns the wheel twice. Round 1: the first file lands in ``s3://<bucket>/demo/prompts/``, is
   ingested, SIMULATED annotators answer the new tasks through the Label Studio API with the
   sample's reference answers (a stand-in for people, and labelled so in the output), and the
   ``sft_pipeline`` flow on the stack's Prefect server waits, builds version 1 and fine-tunes
   model 1. Round 2: the second file lands and is ingested; model 1 (the dataset's best) drafts
   three open tasks in four (the rest: a control group); the annotators accept one draft in
   three unchanged and edit the others, each reporting a SIMULATED ``lead_time``; version 2
   reports model 1's acceptance rate, mean edit and seconds saved per task against the control
   group, and model 2 trains on it;
4. prints what happened to every record, the wheel's figures, and where to look.

A second run reuses everything: nothing new is imported, there is nothing to draft or annotate,
each round's wait ends at once in its "not enough" state, and the existing versions and models
are shown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from sftflow.core.errors import SftflowError
from sftflow.core.hashing import sha256_hex
from sftflow.core.settings import Settings, get_settings
from sftflow.core.urls import redact_url
from sftflow.demo.sample import SAMPLE_PATH
from sftflow.tasks.adapters.clients import Clients, prefect_api

PROJECT = "sftflow-demo"
DATASET = "demo"
PROMPTS_PREFIX = "demo/prompts/"
TRAIN_POOL = "sftflow-demo-train"
console = Console(emoji=False)


def _sample_answers() -> dict[str, str]:
    """prompt_id -> reference response, for the simulated annotators."""
    from sftflow.tasks.ingest.prompts import prompt_id

    answers = {}
    for line in SAMPLE_PATH.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if isinstance(row.get("prompt"), str) and row["prompt"].strip():
            answers[prompt_id(row["prompt"])] = row.get("response", "")
    return answers


#: One simulated annotator in this many accepts a model's draft unchanged; the others edit it
#: into the sample's reference answer.
ACCEPT_ONE_IN = 3


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def simulated_response(prompt_id: str, reference: str, predictions: list[Any]) -> tuple[str, int | None]:
    """What a simulated annotator submits, and the draft (prediction id) it started from.

    With a model's draft on the task (the newest prediction), the annotator starts from it, as
    Label Studio's editor does (``parent_prediction``): one prompt in ``ACCEPT_ONE_IN`` (by its
    id, so reruns agree) is accepted unchanged, the others are edited into the reference
    answer. Without a draft: the reference answer, written from nothing."""
    drafts = [p for p in predictions if _draft_text(p) is not None]
    if not drafts:
        return reference, None
    newest = max(drafts, key=lambda p: int(_get(p, "id")))
    if int(sha256_hex(prompt_id.encode())[:8], 16) % ACCEPT_ONE_IN == 0:
        return _draft_text(newest) or "", int(_get(newest, "id"))
    return reference, int(_get(newest, "id"))


#: How the simulated annotators' ``lead_time`` is made up (seconds): open the task and read the
#: prompt; write from nothing (think, then type) or read the draft and accept it or type the
#: edits (characters changed: edit distance); times a per-prompt factor in [0.8, 1.2).
ORIENT_S, READ_S_PER_CHAR, THINK_S, TYPE_S_PER_CHAR, ACCEPT_S, EDIT_S = 5.0, 0.03, 10.0, 0.25, 2.0, 4.0
#: One open task in this many is left undrafted in round 2: the control group a build compares
#: drafted annotations with (like-for-like prompt lengths, the same period).
CONTROL_ONE_IN = 4


def simulated_lead_time(prompt_id: str, prompt: str, response: str, draft: str | None) -> float:
    """The ``lead_time`` a simulated annotator reports, as Label Studio's editor would (seconds
    spent on the task): it grows with the prompt and with what is typed, so an accepted draft
    is quick, an edited one costs its edits, and an answer from nothing costs all its text.
    SIMULATED: a plausible model of an annotator, not a measurement."""
    from sftflow.tasks.build.edits import edit_similarity

    seconds = ORIENT_S + READ_S_PER_CHAR * len(prompt)
    if draft is None:
        seconds += THINK_S + TYPE_S_PER_CHAR * len(response)
    elif draft.split() == response.split():
        seconds += READ_S_PER_CHAR * len(draft) + ACCEPT_S
    else:
        edited = (1 - edit_similarity(draft, response)) * max(len(draft), len(response))
        seconds += READ_S_PER_CHAR * len(draft) + EDIT_S + TYPE_S_PER_CHAR * edited
    spread = int(sha256_hex(f"lead_time:{prompt_id}".encode())[:8], 16) / 0x1_0000_0000
    return round(seconds * (0.8 + 0.4 * spread), 1)


def _draft_text(prediction: Any) -> str | None:
    for item in _get(prediction, "result") or []:
        text = (_get(item, "value") or {}).get("text")
        if _get(item, "from_name") == "instruction" and isinstance(text, list) and text:
            return "\n".join(map(str, text))
    return None


class SimulatedAnnotators(threading.Thread):
    """Answers every unannotated task of the demo project until told to stop or a deadline.

    This is a simulation of human annotators: it writes the sample's reference answers through
    the same Label Studio API a person's browser uses, starting from a model's draft when the
    task has one (``simulated_response``), with the ``lead_time`` the editor would record
    (``simulated_lead_time``, a simulated figure).
    """

    def __init__(self, clients: Clients, deadline_s: float = 600.0):
        super().__init__(daemon=True, name="simulated-annotators")
        self.clients = clients
        self.deadline = time.monotonic() + deadline_s
        self.stop = threading.Event()
        self.answered = 0
        self.from_drafts = 0  # answers started from a model's draft
        self.errors: list[str] = []

    def run(self) -> None:
        from sftflow.tasks.adapters.labelstudio import find_project

        ls = self.clients.labelstudio
        answers = _sample_answers()
        delay = 0.5
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            try:
                project = find_project(ls, PROJECT)
                if project is not None:
                    self._answer(ls, project.id, answers)
            except Exception as err:  # noqa: BLE001 - a simulation keeps going, and reports it
                self.errors.append(str(err)[:200])
            self.stop.wait(delay)
            delay = min(delay * 1.5, 3.0)

    def _answer(self, ls: Any, project_id: int, answers: dict[str, str]) -> None:
        for task in ls.tasks.list(project=project_id, fields="all"):
            # Label Studio 1.23 lists total_annotations as 0 here even for annotated tasks:
            # look at the annotations themselves, or every pass annotates every task again.
            if self.stop.is_set() or task.annotations:
                continue
            data = task.data or {}
            pid = data.get("prompt_id", "")
            reference = answers.get(pid)
            if reference is None:
                continue
            predictions = list(task.predictions or [])
            text, parent = simulated_response(pid, reference, predictions)
            draft = next((_draft_text(p) for p in predictions if _get(p, "id") == parent), None)
            ls.annotations.create(
                id=task.id,
                result=[{"from_name": "instruction", "to_name": "prompt", "type": "textarea",
                         "value": {"text": [text]}}],
                lead_time=simulated_lead_time(pid, str(data.get("prompt") or ""), text, draft),
                **({"parent_prediction": parent} if parent is not None else {}),
            )
            self.answered += 1
            self.from_drafts += parent is not None


#: The sample lands in the bucket as two files, one per turn of the wheel: ``round-1`` is
#: annotated from nothing and trains model 1; ``round-2`` arrives later, model 1 drafts it, the
#: annotators edit those drafts, and version 2 trains model 2. A row's round comes from its
#: position (three of every five rows in round 1), so both rounds mix every kind of row.
ROUNDS = (1, 2)


def sample_round(index: int) -> int:
    return 1 if index % 5 < 3 else 2


def _upload_round(clients: Clients, round_no: int) -> str:
    """Put the sample's rows of ``round_no`` under the demo's prompt prefix (unchanged bytes are
    not written again); the prefix's URI, which ingest reads whole."""
    s3 = clients.s3
    s3.ensure_bucket()
    lines = SAMPLE_PATH.read_text(encoding="utf-8").splitlines()
    body = "".join(line + "\n" for i, line in enumerate(lines) if sample_round(i) == round_no).encode()
    key = f"{PROMPTS_PREFIX}round-{round_no}.jsonl"
    try:
        current, _ = s3.get_bytes(key)
    except KeyError:
        current = None
    if current != body:
        s3.put_bytes(key, body, content_type="application/x-ndjson")
    return s3.uri(PROMPTS_PREFIX)


def _tiny_model(workdir: Path) -> Path:
    from sftflow.tasks.finetune.tiny_model import build_tiny_model

    out = workdir / "tiny-chat-model"  # with a chat template: trained in chat format
    if not (out / "config.json").exists():
        texts = [json.loads(line).get("response", "") for line in SAMPLE_PATH.open(encoding="utf-8")]
        build_tiny_model(out, [t for t in texts if isinstance(t, str)], chat=True)
    return out


def _start_worker(api_url: str, workdir: Path) -> subprocess.Popen:
    from sftflow.deployments.trainer import deploy_train_trl

    deploy_train_trl(TRAIN_POOL, "default")
    log = (workdir / "worker.log").open("ab")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", TRAIN_POOL,
         "--type", "process"],
        env={**os.environ, "PREFECT_API_URL": api_url,
             "PREFECT_WORKER_QUERY_SECONDS": "2"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()
    return proc


def _stop_worker(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


#: Longest draft the tiny model writes (it was trained on short answers).
DRAFT_TOKENS = 48
#: How the demo trains its tiny model: a full fine-tune for 40 epochs (about 10 s on 2 cores)
#: teaches a randomly initialised model enough of the sample's answers that its drafts are
#: text ("'meadow' has 2 vowels."), some right and most not; LoRA for one epoch leaves it
#: repeating a role token, every draft empty.
DEMO_TRAINING = {"method": "full", "hyperparameters": {"epochs": 40, "learning_rate": 3e-3}}


def _open_tasks(ls: Any, project_id: int) -> int:
    """Tasks of the project with no annotation yet (what the simulated annotators will answer)."""
    return sum(1 for task in ls.tasks.list(project=project_id, fields="all") if not task.annotations)


def _turn(clients: Clients, round_no: int, base_model: Path) -> dict[str, Any]:
    """One turn of the wheel: the round's prompt file lands; it is ingested; the dataset's best
    model (if there is one yet) drafts every open task; the simulated annotators answer, from
    the drafts where there are some; the pipeline waits for them, builds a version and trains
    a model on it. Each step is idempotent, so a rerun finds nothing to do and says so."""
    from sftflow.flows.draft_responses import DraftParams, draft_responses
    from sftflow.flows.ingest import IngestParams, ingest_prompts
    from sftflow.flows.pipeline import PipelineParams, sft_pipeline
    from sftflow.tasks.finetune.lineage import read_model_ref

    source = _upload_round(clients, round_no)
    console.rule(f"[bold]round {round_no}: {PROMPTS_PREFIX}round-{round_no}.jsonl")
    ingested = ingest_prompts(IngestParams(source=source, project=PROJECT))
    open_tasks = _open_tasks(clients.labelstudio, ingested.project_id)
    drafter, _ = read_model_ref(clients.s3, clients.settings.finetune.models_prefix, DATASET)
    drafted = None
    if open_tasks and drafter:
        to_draft = max(1, open_tasks - open_tasks // CONTROL_ONE_IN)
        console.print(f"model {drafter} (the dataset's best) drafts {to_draft} of the "
                      f"{open_tasks} open tasks (the rest: a control group answered without "
                      "a draft, for the draft return)")
        drafted = draft_responses(DraftParams(job=drafter, project=str(ingested.project_id),
                                              max_new_tokens=DRAFT_TOKENS, max_tasks=to_draft))
    annotators = SimulatedAnnotators(clients)
    console.print(f"[yellow]SIMULATION[/yellow]: simulated annotators answer the {open_tasks} open "
                  "tasks through the Label Studio API (the sample's reference answers"
                  + (", starting from the drafts" if drafted else "")
                  + "; lead_time simulated from text lengths and edits)")
    annotators.start()
    try:
        report = sft_pipeline(PipelineParams(
            source=source, project=PROJECT, dataset=DATASET,
            # Wait until every open task is answered; with none open (a rerun), look once.
            min_new=max(1, open_tasks), wait_timeout_s=300 if open_tasks else 5,
            min_interval_s=2, max_interval_s=5, base_model=str(base_model.resolve()),
            **DEMO_TRAINING,
        )).model_dump(mode="json")
    finally:
        annotators.stop.set()
        annotators.join(timeout=30)
    return {
        "round": round_no, "stage": report["stage"], "message": report["message"],
        "ingest": ingested.model_dump(mode="json"), "open_tasks": open_tasks,
        "drafting_model": drafter if drafted else None,
        "drafts": drafted.model_dump(mode="json", exclude={"failures"}) if drafted else None,
        "simulated_annotations": annotators.answered,
        "simulated_from_drafts": annotators.from_drafts,
        "simulation_errors": annotators.errors[:3],
        "version": (report.get("build") or {}).get("version"),
        "model": (report.get("finetune") or {}).get("job"),
        "eval_gate": ((report.get("finetune") or {}).get("eval_gate") or {}).get("decision"),
        "build": report.get("build"),
    }


def run_demo(settings: Settings, workdir: Path = Path(".demo")) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["SFTFLOW_FINETUNE__TRL_DEPLOYMENT"] = "train-trl/default"
    # Experiment tracking in a local MLflow file store, unless a tracker is configured; the
    # finetune flow reads the settings afresh.
    os.environ.setdefault("SFTFLOW_MLFLOW__TRACKING_URI", (workdir / "mlruns").resolve().as_uri())
    get_settings.cache_clear()
    clients = Clients(settings)
    started = time.monotonic()
    console.rule("[bold]sftflow demo")
    console.print(f"sample: {SAMPLE_PATH.name} ({sum(1 for _ in SAMPLE_PATH.open())} rows), "
                  f"in {len(ROUNDS)} rounds of prompt files under s3://{settings.s3.bucket}/{PROMPTS_PREFIX}")
    model = _tiny_model(workdir)
    console.print(f"base model: tiny Llama-style model built locally at {model}")

    rounds = []
    with prefect_api(settings) as api_url:  # an explicit PREFECT_API_URL wins over the stack's
        worker = _start_worker(api_url, workdir)
        try:
            for round_no in ROUNDS:
                rounds.append(_turn(clients, round_no, model))
        finally:
            _stop_worker(worker)
    return _summary(settings, clients, rounds, time.monotonic() - started, workdir)


def wheel_figures(clients: Clients, rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The flywheel's own figure for the demo: in the version built from the round that model 1
    drafted, how often annotators accepted its drafts unchanged and how far they edited them
    (``manifest.stats["drafts"]``, computed by the build)."""
    from sftflow.tasks.versions.read import load_manifest

    turned = [r for r in rounds if r["drafting_model"] and r["version"]]
    if not turned:
        return None
    last = turned[-1]
    manifest = load_manifest(clients.s3, DATASET, last["version"], verify=False,
                             prefix=clients.settings.datasets.prefix)
    drafts = manifest.stats.get("drafts") or {}
    figures = (drafts.get("models") or {}).get(last["drafting_model"]) or {}
    saved = ((drafts.get("return") or {}).get("models") or {}).get(last["drafting_model"]) or {}
    return {"drafting_model": last["drafting_model"], "version": last["version"],
            "trained": last["model"], "policy": drafts.get("policy"),
            "excluded_by_policy": drafts.get("excluded"), **figures,
            "draft_return": {**saved, "lead_time": "simulated"} if saved else None}


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} s"


def _reproduced(settings: Settings, clients: Clients, job: str, workdir: Path) -> dict[str, Any]:
    """``sftflow models reproduce JOB`` of the newest model: its token stream re-tokenised from
    the dataset version and the training record."""
    from sftflow.tasks.finetune.reproduce import reproduce

    result = reproduce(clients.s3, settings.finetune.models_prefix, settings.datasets.prefix, job,
                       workdir / "reproduce")
    return {"job": job, "identical": result.identical, "batches_compared": result.batches_compared,
            "rows_identical": result.rows_identical, "differences": result.differences}


def _summary(settings: Settings, clients: Clients, rounds: list[dict[str, Any]],
             seconds: float, workdir: Path) -> dict[str, Any]:
    from sftflow.tasks.adapters.labelstudio import find_project
    from sftflow.tasks.finetune.lineage import list_records
    from sftflow.tasks.versions.refs import latest_version

    project = find_project(clients.labelstudio, PROJECT)
    version = latest_version(clients.s3, DATASET, prefix=settings.datasets.prefix)
    if version is None:
        raise SftflowError(f"the demo made no dataset version: {rounds[-1]['message']}")
    models_prefix = settings.finetune.models_prefix
    records = list_records(clients.s3, models_prefix, dataset=DATASET)  # oldest submission first
    newest = records[-1].job if records else None
    wheel = wheel_figures(clients, rounds)
    summary = {
        "stage": rounds[-1]["stage"],
        "message": rounds[-1]["message"],
        "seconds": round(seconds, 1),
        "simulated_annotations": sum(r["simulated_annotations"] for r in rounds),
        "simulated_from_drafts": sum(r["simulated_from_drafts"] for r in rounds),
        "rounds": [{k: v for k, v in r.items() if k != "build"} for r in rounds],
        "flywheel": wheel,
        "prefect_ui": settings.prefect.api_url.removesuffix("/api") + "/runs",
        "labelstudio_project": (f"{redact_url(settings.labelstudio.url)}/projects/{project.id}"
                                if project else None),
        "dataset_version": (f"s3://{settings.s3.bucket}/{settings.datasets.prefix}/{DATASET}/"
                            f"versions/{version}/manifest.json"),
        "models": [r.job for r in records],
        "model_manifest": (f"s3://{settings.s3.bucket}/{models_prefix}/{newest}/manifest.json"
                           if newest else None),
        "reproduced": _reproduced(settings, clients, newest, workdir) if newest else None,
    }
    _print_records(rounds)
    if wheel:
        _print_wheel(wheel)
    _print_where(summary, seconds)
    return summary


def _print_records(rounds: list[dict[str, Any]]) -> None:
    """What happened to every record, round by round."""
    console.rule("[bold]what happened to every record")
    for r in rounds:
        ing = r["ingest"]
        reasons = ", ".join(f"{k}: {v}" for k, v in (ing.get("reasons") or {}).items()) or "none"
        console.print(f"round {r['round']} ingest: {ing.get('records', 0)} records -> "
                      f"{ing.get('imported', 0)} imported, {ing.get('duplicate', 0)} duplicate, "
                      f"{ing.get('quarantined', 0)} quarantined ({reasons})")
        if r["drafts"]:
            d = r["drafts"]
            console.print(f"round {r['round']} drafts by {r['drafting_model']}: {d['drafted']} drafted, "
                          f"{sum(d['failed'].values())} failed")
        for step in ("export", "filters", "dedup"):
            counts = ((r["build"] or {}).get("counts") or {}).get(step)
            if counts:
                console.print(f"round {r['round']} build {step}: " + ", ".join(
                    f"{k}: {v}" for k, v in counts.items() if not isinstance(v, (dict, list))))
        console.print(f"round {r['round']}: {r['simulated_annotations']} simulated annotations "
                      f"({r['simulated_from_drafts']} from drafts); version {r['version'] or '-'}; "
                      f"model {r['model'] or '-'} ({r['eval_gate'] or 'no eval gate'}); "
                      f"{r['stage']}: {r['message']}")


def _print_wheel(wheel: dict[str, Any]) -> None:
    """The turn of the wheel: model 1's drafts in version 2, and their (simulated) return."""
    console.rule("[bold]the turn of the wheel")
    rate, sim = wheel.get("acceptance_rate"), wheel.get("mean_similarity")
    console.print(
        f"model {wheel['drafting_model']} drafted round 2; version {wheel['version']} records "
        f"{wheel.get('rows', 0)} answers started from its drafts: "
        f"{wheel.get('accepted_unchanged', 0)} accepted unchanged (acceptance rate "
        f"{'-' if rate is None else f'{rate:.0%}'}), mean edit similarity "
        f"{'-' if sim is None else f'{sim:.2f}'}; {wheel.get('excluded_by_policy') or 0} "
        f"unedited drafts left out of training (draft_policy={wheel.get('policy')}); "
        f"model {wheel['trained'] or '-'} trained on that version")
    if saved := wheel.get("draft_return"):
        console.print(
            f"[yellow]SIMULATED[/yellow] draft return (the simulated annotators' lead_time): "
            f"{_secs(saved.get('saved_per_task_s'))} saved per task, "
            f"{_secs(saved.get('saved_total_s'))} in total over {saved.get('compared', 0)} "
            f"drafted answers ({_secs(saved.get('median_with_draft_s'))} with a draft, "
            f"{_secs(saved.get('median_without_draft_s'))} without, like-for-like prompt "
            f"lengths); sftflow datasets show {DATASET}")


def _print_where(summary: dict[str, Any], seconds: float) -> None:
    """Where to look: the UIs, the version, the model, and the reproduction's verdict."""
    console.rule("[bold]where to look")
    console.print(f"Prefect UI (flow runs):   {summary['prefect_ui']}")
    console.print(f"Label Studio project:     {summary['labelstudio_project']}")
    console.print(f"dataset version:          {summary['dataset_version']}")
    console.print(f"                          sftflow datasets show {DATASET}")
    console.print(f"model lineage manifest:   {summary['model_manifest']}")
    console.print("                          sftflow models list")
    if rep := summary["reproduced"]:
        console.print(f"reproduced:               model {rep['job']}'s token stream, re-tokenised from its "
                      f"version and training record: {'identical' if rep['identical'] else 'DIFFERS'} "
                      f"({rep['batches_compared']} batches compared, rows "
                      f"{'identical' if rep['rows_identical'] else 'differ'}); "
                      f"sftflow models reproduce {rep['job']}")
    console.print(f"simulated annotations this run: {summary['simulated_annotations']} "
                  f"({summary['simulated_from_drafts']} started from a model's draft); {seconds:.0f} s")
