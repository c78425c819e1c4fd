"""Flow ``finetune``: train a model on a dataset version, watch the job, record its lineage.

Trigger: ``sftflow finetune``, the pipeline flow, or a deployment reacting to
``sftflow.dataset.versioned``.

Inputs (:class:`FinetuneParams`): dataset ``NAME[@VERSION]`` (default: ``refs/latest``), backend
(``trl`` by default, ``openai``, or any other in :data:`BACKENDS`), base model, method (full or
LoRA), hyperparameters, gates and watch deadline.

Before any side effect: the version's manifest is read and every file's sha256 verified; the
gates (minimum train rows, eval split present, prompt/completion format, chat JSONL valid for
``openai``) and the backend's preflight (base model exists, training deployment registered)
must pass, else the flow fails with one clear error and nothing is submitted.

Outputs: ``s3://<bucket>/<models_prefix>/<job>/manifest.json`` (lineage: dataset version and
its manifest sha256, base model, config, backend and job id, status, metrics, artifacts, eval
gate, few-shot baseline, error, loss per step); for ``trl`` the model or adapter under
``<job>/model/``; the dataset tag ``trained-<job>`` on the version; ``_refs/<dataset>/best``
moved to a model that beats both the previous best and the few-shot baseline (the base model
with ``finetune.few_shot_k`` train rows, chosen by ``finetune.few_shot_seed``, in its prompt,
scored by the training job on the same eval completions; cached per base model, version, k
and seed under ``<models_prefix>/_few_shot/``; ``openai`` records why it has none); events
``sftflow.finetune.submitted | succeeded | failed``; Prefect artifacts with the gates and result;
with ``SFTFLOW_MLFLOW__TRACKING_URI`` set, one MLflow run per job (``tasks/finetune/tracking.py``:
params, loss per step, the dataset version as input, the lineage record's URI), named in the
record's ``tracking``.

Idempotency: the job name is a hash of (version manifest sha256, normalised config). A rerun
with a finished job returns it without training again (a failed one fails again with its
recorded error, never a new attempt); a rerun after a crash resumes watching the job it had
submitted (submission is idempotent per job name on every backend). One run only submits: it
claims the lineage record with a conditional write (``If-None-Match``, or ``If-Match`` to take
over a claim older than ``claim_ttl_s``) and renews the claim every ``claim_ttl_s / 3`` until
the record names its job, however long the submission takes (a ``trl`` training in local mode
is the submission); a concurrent run waits for the job the claimer names and watches the same
one, or, when the claim stays live for longer than it waits, is refused (the refusal is in the
record's history) without starting the job a second time. A run killed between claiming and
naming its job renews nothing: its claim expires and the rerun takes it over (the backend finds
the job it had submitted, or it trains again).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal, NoReturn

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from sftflow.core import events
from sftflow.core.clock import utc_now_iso
from sftflow.core.errors import SftflowError
from sftflow.core.failpoints import failpoint
from sftflow.flows.train_trl import train_trl
from sftflow.tasks.adapters.clients import Clients
from sftflow.tasks.adapters.s3 import S3
from sftflow.tasks.finetune import few_shot, lineage
from sftflow.tasks.finetune.backends import (
    Backend,
    BackendFactory,
    Hyperparameters,
    JobStatus,
    cancel_job_task,
    get_backend,
    job_result_task,
    job_status_task,
    preflight_task,
    submit_job_task,
)
from sftflow.tasks.finetune.dataset import read_version_task, tag_trained_task
from sftflow.tasks.finetune.gate import check_gates_task
from sftflow.tasks.finetune.lineage import (
    LineageRecord,
    claim_submission_task,
    eval_gate_task,
    find_baseline_task,
    find_record_task,
    update_record_task,
)
from sftflow.tasks.finetune.openai_backend import OpenAIBackend
from sftflow.tasks.finetune.tracking import track_job_task
from sftflow.tasks.finetune.trl_backend import TrlBackend
from sftflow.tasks.runtime.polling import Backoff, wait_until

#: The backends by name. A new one (SageMaker, a Kubernetes Job) is a module implementing
#: ``tasks.finetune.backends.Backend`` plus one entry here. ``trl`` in local mode runs the
#: ``train-trl`` flow in this process.
BACKENDS: dict[str, BackendFactory] = {
    "trl": lambda clients: TrlBackend.from_clients(clients, run_local=partial(train_trl, return_state=True)),
    "openai": OpenAIBackend.from_clients,
}


class FinetuneParams(BaseModel):
    dataset: str = Field(description="Dataset version to train on: NAME or NAME@VERSION (default latest).")
    backend: str | None = Field(None, description="trl (default from settings), openai, or another in BACKENDS.")
    base_model: str = Field(description="Base model: hub id, s3:// prefix or local folder (trl); model name (openai).")
    method: Literal["full", "lora"] = Field("lora", description="Full fine-tune or LoRA adapter (trl).")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Training knobs.")
    min_train_rows: int = Field(10, ge=1, description="Gate: the version needs at least this many train rows.")
    min_eval_rows: int = Field(1, ge=0, description="Gate: and this many eval rows (0 allows no eval split).")
    deadline_s: float = Field(6 * 3600, gt=0, description="Stop watching after this long (the job keeps its record).")
    poll_min_s: float = Field(2.0, gt=0, description="First pause between status polls.")
    poll_max_s: float | None = Field(None, gt=0, description=(
        "Longest pause between status polls (backoff cap); empty: the backend's own (trl 5 s, "
        "its state read from this Prefect API; openai 60 s)."))
    cancel_on_deadline: bool = Field(False, description="Cancel the job when the deadline passes.")
    eval_gate: bool = Field(True, description="Compare eval loss with the dataset's best model; tag the better one best.")
    claim_ttl_s: float = Field(900.0, gt=0, description=(
        "How long a run's claim to submit the job lasts unrenewed (its holder renews it every "
        "third of this while it lives); past it (the run died before naming its job) another "
        "run takes the claim over and looks the job up before submitting."))
    bucket: str | None = Field(None, description="Bucket of datasets and models (empty: the configured bucket).")


class FinetuneReport(BaseModel):
    job: str
    dataset: str
    version: str
    backend: str
    backend_job_id: str | None = None
    status: str
    reused: bool = False
    metrics: dict[str, Any] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict)
    fine_tuned_model: str | None = None
    eval_gate: dict[str, Any] | None = None
    few_shot: dict[str, Any] | None = None
    error: str | None = None
    lineage_uri: str
    gates: list[dict[str, Any]] = Field(default_factory=list)

    @classmethod
    def from_record(cls, record: LineageRecord, reused: bool, gates: list[dict[str, Any]]) -> FinetuneReport:
        return cls(**record.model_dump(include=set(cls.model_fields)), reused=reused, gates=gates)


@flow(name="finetune", flow_run_name="finetune {params.dataset} on {params.base_model}")
def finetune(params: FinetuneParams) -> FinetuneReport:
    """Fine-tune a model on a dataset version: gates, one submission per (version, config),
    watch to the end, lineage in the bucket, eval gate and ``best`` ref, events."""
    logger = get_run_logger()
    clients = Clients.for_bucket(params.bucket)
    s3, settings = clients.s3, clients.settings
    prefix, datasets_prefix = settings.finetune.models_prefix, settings.datasets.prefix
    backend_name = params.backend or settings.finetune.backend
    use_eval_gate = backend_name == "trl" and params.eval_gate

    # 1. Everything that can be wrong with the input fails here, before any side effect.
    data = read_version_task(s3, datasets_prefix, params.dataset)
    gates = check_gates_task(data, backend_name, params.min_train_rows, params.min_eval_rows)
    backend = get_backend(backend_name, clients, BACKENDS)
    config = lineage.job_config(backend_name, params.base_model, params.method, params.hyperparameters)
    job = lineage.job_name(data.manifest_sha256, config)
    earlier = find_record_task(s3, prefix, job)
    if earlier and earlier.terminal:
        return _reused(earlier, gates)
    spec = data.job_spec(job=job, base_model=params.base_model, method=params.method,
                         hyperparameters=params.hyperparameters, output_uri=lineage.output_uri(s3, prefix, job))
    baseline_etag = None
    if use_eval_gate:
        spec.baseline, baseline_etag = find_baseline_task(s3, prefix, data.dataset, job)
        spec.few_shot = few_shot.plan(spec, settings.finetune.few_shot_k, settings.finetune.few_shot_seed,
                                      s3.uri(prefix.strip("/")))
    checks = preflight_task(backend, spec)

    # 2. Submit once: claim the record (conditional writes), submit, name the job in the record.
    record, mine = _claim(LineageRecord.submitted(
        job=job, data=data, config=config, baseline=spec.baseline, preflight=checks,
        lineage_uri=s3.uri(lineage.manifest_key(prefix, job)), run_id=str(flow_run.get_id()),
        claim_ttl_s=params.claim_ttl_s), params, s3=s3, prefix=prefix, backend=backend)
    if record.terminal:
        return _reused(record, gates)
    backend_job_id = record.backend_job_id
    if mine:
        with lineage.hold_claim(s3, prefix, record, params.claim_ttl_s):  # renewed until named
            backend_job_id = submit_job_task(backend, spec)
            failpoint("finetune.after-submit")
            record = update_record_task(s3, prefix, job, {"backend_job_id": backend_job_id})
        _emit(events.FINETUNE_SUBMITTED, record)
        logger.info("submitted %s as %s job %s", job, backend_name, backend_job_id)
        failpoint("finetune.after-lineage")
    else:
        logger.info("resuming watch of %s (%s job %s)", job, backend_name, backend_job_id)

    # 3. Watch to a terminal state within the deadline (each change goes into the history).
    final = _watch(backend, backend_job_id, params, prefix=prefix, s3=s3, job=job)
    if final is None:
        _deadline_passed(backend, record, params, prefix=prefix, s3=s3)

    # 4. Record the outcome: lineage, eval gate, dataset tag, events.
    if final.state != "succeeded":
        failed: dict[str, Any] = {"status": final.state, "error": final.error, "finished_at": utc_now_iso()}
        failed["tracking"] = track_job_task(settings, record.model_copy(update=failed))
        record = update_record_task(s3, prefix, job, failed)
        _published(events.FINETUNE_FAILED, record)
        raise SftflowError(f"fine-tune job {job} {final.state}: {final.error} (lineage {record.lineage_uri})")
    result = job_result_task(backend, backend_job_id, spec)
    changes: dict[str, Any] = {"status": "succeeded", "finished_at": utc_now_iso(), "metrics": result.metrics,
                               "artifacts": result.artifacts, "fine_tuned_model": result.fine_tuned_model,
                               "loss_history": result.history}
    if result.training_record:
        changes["training_record"] = result.training_record
    shots = few_shot.recorded(spec, backend_name, settings.finetune.few_shot_k,
                              settings.finetune.few_shot_seed, result.few_shot)
    if shots:
        changes["few_shot"] = shots
    if use_eval_gate:
        changes["eval_gate"] = eval_gate_task(s3, prefix, data.dataset, job, result.metrics, spec.baseline,
                                              baseline_etag, shots)
    changes["dataset_tag"] = tag_trained_task(s3, datasets_prefix, data, job)
    changes["tracking"] = track_job_task(settings, record.model_copy(update=changes))
    record = update_record_task(s3, prefix, job, changes, event="recorded")
    _published(events.FINETUNE_SUCCEEDED, record)
    return FinetuneReport.from_record(record, False, gates)


def _claim(new: LineageRecord, params: FinetuneParams, *, s3: S3, prefix: str,
           backend: Backend) -> tuple[LineageRecord, bool]:
    """``(record, True)`` when this run holds the claim and submits; else the record once it
    names the job (or has ended), waiting while another run holds a live claim. A claim
    expires ``claim_ttl_s`` after its holder last renewed it (the holder died): then this run
    takes it over. While it waits, a backend that can look jobs up (``find_job``) is asked: a
    holder killed after submitting left a job the provider knows, and this run adopts it at
    once. A claim still live when the wait ends (its holder is still submitting, e.g. training
    locally) refuses this run: see :func:`_refuse`."""
    lookup = getattr(backend, "find_job", None)

    def probe() -> tuple[LineageRecord, bool] | None:
        record, mine = claim_submission_task(s3, prefix, new)
        if mine or record.backend_job_id or record.terminal:
            return record, mine
        found = lookup(new.job) if lookup else None
        if found and found.get("id"):
            adopted = update_record_task(s3, prefix, new.job, {"backend_job_id": str(found["id"])},
                                         event="adopted the job its claimant submitted")
            return adopted, False
        return None

    backoff = _backoff(params, backend)
    waited_s = params.claim_ttl_s + backoff.max_interval_s * 2
    found = wait_until(probe, timeout_s=waited_s, backoff=backoff)
    # one last look: the job may have been named as the wait ended
    return found or probe() or _refuse(new, waited_s, s3=s3, prefix=prefix)


def _backoff(params: FinetuneParams, backend: Backend) -> Backoff:
    """Status polls: from ``poll_min_s`` up to ``poll_max_s``, or the backend's own cap."""
    cap = params.poll_max_s if params.poll_max_s is not None else backend.poll_max_s
    return Backoff(params.poll_min_s, max(params.poll_min_s, cap))


def _refuse(new: LineageRecord, waited_s: float, *, s3: S3, prefix: str) -> NoReturn:
    """Another run's claim stayed live (renewed: its submission is still running) for the
    whole wait: record the refusal in the job's history and fail without submitting."""
    current = find_record_task(s3, prefix, new.job)
    held = current.claim if current else None
    holder = (f"run {held.run_id} holds the claim to submit it (renewed while its submission "
              f"runs, live until {held.expires_at:%Y-%m-%dT%H:%M:%SZ})") if held else "another run holds its claim"
    update_record_task(s3, prefix, new.job, {}, event=f"run {new.claim.run_id} refused: {holder}")
    raise SftflowError(f"job {new.job}: {holder}; not starting it a second time (waited {waited_s:.0f} s "
                       f"without the job being named). Rerun later to watch the job it names.")


def _reused(earlier: LineageRecord, gates: list[dict[str, Any]]) -> FinetuneReport:
    """A job that already ended: its report, or its recorded error again (never a new attempt)."""
    where = f"{earlier.dataset}@{earlier.version}"
    get_run_logger().info("%s with this config is job %s (%s): not training again", where, earlier.job,
                          earlier.status)
    if earlier.status != "succeeded":
        raise SftflowError(f"job {earlier.job} on {where} already ended {earlier.status}: {earlier.error} "
                           f"(lineage {earlier.lineage_uri}); change the config to train again")
    return FinetuneReport.from_record(earlier, True, gates)


def _watch(backend: Backend, backend_job_id: str, params: FinetuneParams, *, s3: S3, prefix: str,
           job: str) -> JobStatus | None:
    """Poll with backoff until a terminal state (returned) or the deadline (None). Each new
    non-terminal state is recorded; terminal ones are recorded with their outcome."""
    last: dict[str, Any] = {"state": None, "changed": False}

    def probe() -> JobStatus | None:
        status = job_status_task(backend, backend_job_id)
        last["changed"], last["state"] = status.state != last["state"], status.state
        if last["changed"] and not status.terminal:
            update_record_task(s3, prefix, job, {"status": status.state, "backend_status": status.detail},
                               event=status.state)
        return status if status.terminal else None

    backoff = _backoff(params, backend)
    return wait_until(probe, timeout_s=params.deadline_s, backoff=backoff, progressed=lambda _: last["changed"])


def _deadline_passed(backend: Backend, record: LineageRecord, params: FinetuneParams, *, s3: S3,
                     prefix: str) -> NoReturn:
    """Cancel the job if asked to, and fail saying how to keep watching."""
    if params.cancel_on_deadline:
        cancel_job_task(backend, record.backend_job_id)
        record = update_record_task(s3, prefix, record.job, {
            "status": "cancelled", "finished_at": utc_now_iso(),
            "error": f"deadline of {params.deadline_s:.0f} s passed"}, event="cancelled (deadline)")
        _emit(events.FINETUNE_FAILED, record)
    raise SftflowError(f"job {record.job} ({record.backend} {record.backend_job_id}) did not finish within "
                       f"{params.deadline_s:.0f} s; rerun the same command to keep watching")


def _emit(name: str, record: LineageRecord) -> None:
    emit_event(event=name, resource=events.model_resource(record.job),
               related=[{**events.dataset_resource(record.dataset), "prefect.resource.role": "dataset"}],
               payload=record.event_payload())


def _published(name: str, record: LineageRecord) -> None:
    """The outcome's event and the ``finetune-result`` markdown artifact."""
    _emit(name, record)
    create_markdown_artifact(key="finetune-result", markdown=record.summary_markdown(),
                             description=f"Lineage of {record.job}")
