"""``sftflow demo``: the whole loop on the project's own sample, against the local stack.

1. builds a tiny Llama-style model locally (no hub) and registers the ``train-trl`` deployment
   on a process work pool, with a worker that this demo starts and stops by pid;
2. uploads ``sample_prompts.jsonl`` to ``s3://<bucket>/demo/prompts/``;
3. runs the ``sft_pipeline`` flow on the stack's Prefect server: ingest -> wait -> build ->
   fine-tune, while SIMULATED annotators answer the new tasks through the Label Studio API with the
   sample's reference answers (a stand-in for people, and labelled so in the output);
4. prints where to look.

A second run reuses everything: nothing new is imported, there is nothing to annotate, the wait
stage ends at once in its "not enough" state, and the existing version and model are shown.
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
from sftflow.demo.sample import SAMPLE_PATH
from sftflow.tasks.clients import Clients, prefect_api

PROJECT = "sftflow-demo"
DATASET = "demo"
PROMPTS_PREFIX = "demo/prompts/"
TRAIN_POOL = "sftflow-demo-train"
console = Console(emoji=False)


def _sample_answers() -> dict[str, str]:
    """prompt_id -> reference response, for the simulated annotators."""
    from sftflow.tasks.prompts import prompt_id

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
    task has one (``simulated_response``).
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
        from sftflow.tasks.labelstudio import find_project

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
            text, parent = simulated_response(pid, reference, list(task.predictions or []))
            ls.annotations.create(
                id=task.id,
                result=[{"from_name": "instruction", "to_name": "prompt", "type": "textarea",
                         "value": {"text": [text]}}],
                **({"parent_prediction": parent} if parent is not None else {}),
            )
            self.answered += 1
            self.from_drafts += parent is not None


def _upload_sample(clients: Clients) -> str:
    s3 = clients.s3
    s3.ensure_bucket()
    key = PROMPTS_PREFIX + "sample.jsonl"
    body = SAMPLE_PATH.read_bytes()
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


def run_demo(settings: Settings, workdir: Path = Path(".demo")) -> dict[str, Any]:
    from sftflow.flows.pipeline import PipelineParams, sft_pipeline
    from sftflow.tasks.labelstudio import find_project

    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["SFTFLOW_FINETUNE__TRL_DEPLOYMENT"] = "train-trl/default"
    # Experiment tracking in a local MLflow file store, unless a tracker is configured; the
    # finetune flow reads the settings afresh.
    os.environ.setdefault("SFTFLOW_MLFLOW__TRACKING_URI", (workdir / "mlruns").resolve().as_uri())
    get_settings.cache_clear()
    clients = Clients(settings)
    started = time.monotonic()
    console.rule("[bold]sftflow demo")
    source = _upload_sample(clients)
    console.print(f"sample: {SAMPLE_PATH.name} ({sum(1 for _ in SAMPLE_PATH.open())} rows) -> {source}")
    model = _tiny_model(workdir)
    console.print(f"base model: tiny Llama-style model built locally at {model}")

    existing = find_project(clients.labelstudio, PROJECT)
    rerun = existing is not None and (existing.task_number or 0) > 0
    annotators = SimulatedAnnotators(clients)
    with prefect_api(settings) as api_url:  # an explicit PREFECT_API_URL wins over the stack's
        worker = _start_worker(api_url, workdir)
        try:
            console.print("[yellow]SIMULATION[/yellow]: simulated annotators answer new tasks "
                          "through the Label Studio API with the sample's reference answers")
            annotators.start()
            report = sft_pipeline(PipelineParams(
                source=source, project=PROJECT, dataset=DATASET,
                # First run: wait until the simulated annotators answered every sample prompt.
                min_new=1 if rerun else len(_sample_answers()),
                wait_timeout_s=15 if rerun else 300,
                min_interval_s=2, max_interval_s=5, base_model=str(model.resolve()),
            ))
        finally:
            annotators.stop.set()
            annotators.join(timeout=30)
            _stop_worker(worker)
    return _summary(settings, clients, report.model_dump(mode="json"), annotators,
                    time.monotonic() - started)


def _summary(settings: Settings, clients: Clients, report: dict, annotators: SimulatedAnnotators,
             seconds: float) -> dict[str, Any]:
    from sftflow.tasks.labelstudio import find_project
    from sftflow.tasks.versioning import latest_version

    project = find_project(clients.labelstudio, PROJECT)
    version = latest_version(clients.s3, DATASET, prefix=settings.datasets.prefix)
    models_prefix = settings.finetune.models_prefix
    ft = report.get("finetune") or {}
    if not ft.get("job"):  # a rerun stops before fine-tuning: show the newest existing model
        from sftflow.tasks.finetune.lineage import list_records

        records = list_records(clients.s3, models_prefix, dataset=DATASET)
        ft = records[-1].to_dict() if records else {}  # oldest submission first
    summary = {
        "stage": report["stage"],
        "message": report["message"],
        "seconds": round(seconds, 1),
        "simulated_annotations": annotators.answered,
        "simulated_from_drafts": annotators.from_drafts,
        "simulation_errors": annotators.errors[:3],
        "ingest": report.get("ingest"),
        "prefect_ui": settings.prefect.api_url.removesuffix("/api") + "/runs",
        "labelstudio_project": f"{settings.labelstudio.url}/projects/{project.id}" if project else None,
        "dataset_version": (f"s3://{settings.s3.bucket}/{settings.datasets.prefix}/{DATASET}/"
                            f"versions/{version}/manifest.json") if version else None,
        "model_manifest": ft.get("lineage_uri")
        or (f"s3://{settings.s3.bucket}/{models_prefix}/{ft['job']}/manifest.json"
            if ft.get("job") else None),
    }
    if version is None:
        raise SftflowError(f"the demo made no dataset version: {report['message']}")
    console.rule("[bold]what happened to every record")
    ing = report.get("ingest") or {}
    if ing:
        reasons = ", ".join(f"{k}: {v}" for k, v in (ing.get("reasons") or {}).items()) or "none"
        console.print(f"ingest: {ing.get('records', 0)} records -> {ing.get('imported', 0)} imported, "
                      f"{ing.get('duplicate', 0)} duplicate, {ing.get('quarantined', 0)} quarantined "
                      f"({reasons})")
    built = report.get("build") or {}
    for step in ("export", "filters", "dedup"):
        counts = (built.get("counts") or {}).get(step)
        if counts:
            console.print(f"build {step}: " + ", ".join(f"{k}: {v}" for k, v in counts.items()
                                                         if not isinstance(v, (dict, list))))
    console.rule("[bold]where to look")
    console.print(f"Prefect UI (flow runs):   {summary['prefect_ui']}")
    console.print(f"Label Studio project:     {summary['labelstudio_project']}")
    console.print(f"dataset version:          {summary['dataset_version']}")
    console.print(f"                          sftflow datasets show {DATASET}")
    console.print(f"model lineage manifest:   {summary['model_manifest']}")
    console.print("                          sftflow models list")
    console.print(f"simulated annotations this run: {annotators.answered} "
                  f"({annotators.from_drafts} started from a model's draft); "
                  f"pipeline stage reached: {report['stage']} ({report['message']}); "
                  f"{seconds:.0f} s")
    return summary
