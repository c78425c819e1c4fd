"""Optional MLflow tracking: one MLflow run per fine-tune job, written from its lineage record.

Off unless ``SFTFLOW_MLFLOW__TRACKING_URI`` is set (an MLflow server, ``sqlite:///mlflow.db``,
``file:/path`` for a local file store, ``databricks``). The ``finetune`` flow calls :func:`track_job` once the job has
ended, whatever the backend, so the training machine needs no route to the tracker. The run
(in experiment ``SFTFLOW_MLFLOW__EXPERIMENT``, named after the job) holds:

- params: job, dataset, version, backend, base model, method, config hash and every
  hyperparameter (``hp.<name>``);
- metrics per step: every numeric field of the job's loss history (``loss``, ``eval_loss``,
  ``learning_rate``, ``grad_norm``, ``epoch`` for ``trl``; the provider's names for ``openai``),
  then the job's final numeric metrics at the last step;
- the dataset version as the run's input: an MLflow dataset ``<dataset>@<version>`` whose source
  is the version's ``manifest.json`` (s3://), digest the manifest's sha256 (first 32 hex digits:
  MLflow's SQL stores cap digests at 36 characters; the full one is the tag
  ``sftflow.dataset_manifest_sha256``), context ``train``;
- tags: ``sftflow.job``, ``sftflow.lineage_uri`` (the lineage record, ``models/<job>/manifest.json``),
  the dataset manifest, status, eval gate decision; the run ends FINISHED or FAILED;
- the loss curves PNG as the artifact ``loss.png``.

Idempotency: the run is found by its ``sftflow.job`` tag. A finished run of the job is returned
as it is; a run left unfinished by a crash is deleted and logged again.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import BaseModel

from sftflow.core.urls import redact_url
from sftflow.tasks.finetune.lineage import LineageRecord
from sftflow.tasks.finetune.loss_plot import loss_curve_png
from sftflow.tasks.runtime.declare import io_task
from sftflow.tasks.runtime.polling import Backoff, retry

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from sftflow.core.settings import Settings

JOB_TAG = "sftflow.job"
_BATCH = 1000  # MLflow's limit of metrics per log_batch


class TrackedRun(BaseModel):
    """Where a job's MLflow run is (recorded in the lineage record as ``tracking``; the URI
    without credentials)."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    reused: bool = False


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def run_params(record: LineageRecord) -> dict[str, str]:
    """The run's params: what identifies the job and every hyperparameter as ``hp.<name>``."""
    params = {"job": record.job, "dataset": record.dataset, "version": record.version,
              "backend": record.backend, "base_model": record.base_model,
              "method": record.method or "", "config_hash": record.config_hash or ""}
    params |= {f"hp.{k}": v for k, v in record.hyperparameters.items()}
    return {k: str(v) for k, v in params.items()}


def step_metrics(history: Iterable[Mapping[str, Any]]) -> list[tuple[str, float, int]]:
    """``(key, value, step)`` of every numeric field of every history row that has a step."""
    out = []
    for row in history:
        step = row.get("step")
        if _number(step) is None:
            continue
        out += [(k, v, int(step)) for k, raw in row.items()
                if k != "step" and (v := _number(raw)) is not None]
    return out


def final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics of the job (booleans and texts are left to tags)."""
    return {k: v for k, raw in metrics.items() if (v := _number(raw)) is not None}


def run_tags(record: LineageRecord) -> dict[str, str]:
    tags = {JOB_TAG: record.job, "mlflow.runName": record.job, "sftflow.lineage_uri": record.lineage_uri,
            "sftflow.status": record.status, "sftflow.dataset": f"{record.dataset}@{record.version}",
            "sftflow.dataset_manifest": record.dataset_manifest or "",
            "sftflow.dataset_manifest_sha256": record.dataset_manifest_sha256 or "",
            "sftflow.backend_job_id": record.backend_job_id or ""}
    if record.eval_gate:
        tags["sftflow.eval_gate"] = str(record.eval_gate.get("decision"))
    if record.error:
        tags["sftflow.error"] = record.error[:5000]
    tags |= {f"sftflow.metric.{k}": str(v) for k, v in record.metrics.items()
             if _number(v) is None and v is not None}
    return tags


class TrackerUnreachable(Exception):
    """The tracking server did not answer within the deadline."""


class MlflowTracker:
    """An ``MlflowClient`` on one tracking URI and experiment (created when missing)."""

    def __init__(self, tracking_uri: str, experiment: str = "sftflow", deadline_s: float = 30.0):
        if "://" not in tracking_uri or tracking_uri.startswith("file:"):
            # MLflow >= 3.7 refuses its file store unless opted in; naming a file: URI in
            # sftflow's settings is that choice (the demo's store). sqlite:/// needs no opt-in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.deadline_s = deadline_s
        # MLflow's client retries a server 7 times with a backoff factor of 2 and 120 s
        # timeouts; within the deadline instead (an explicit environment setting wins).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(deadline_s))))
        self.client: MlflowClient = MlflowClient(tracking_uri=tracking_uri)

    @classmethod
    def from_settings(cls, settings: Settings) -> MlflowTracker | None:
        """The configured tracker, None when tracking is off (no tracking URI)."""
        cfg = settings.mlflow
        return cls(cfg.tracking_uri, cfg.experiment, cfg.deadline_s) if cfg.tracking_uri.strip() else None

    def check_reachable(self) -> None:
        """An HTTP tracking server answers within the deadline (any answer counts: only a
        refused or timed-out connection does not), else ``TrackerUnreachable``."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        url = self.tracking_uri.rstrip("/") + "/health"
        try:
            retry(lambda: httpx.get(url, timeout=min(5.0, self.deadline_s)), attempts=20,
                  retry_if=lambda err: isinstance(err, httpx.TransportError),
                  backoff=Backoff(0.5, 5.0), timeout_s=self.deadline_s)
        except httpx.TransportError as err:
            raise TrackerUnreachable(
                f"tracking server {redact_url(self.tracking_uri)} unreachable within "
                f"{self.deadline_s:g} s ({type(err).__name__})") from err

    def experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(self.experiment)

    def find_run(self, experiment_id: str, job: str):
        runs = self.client.search_runs([experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{job}'",
                                       max_results=10)
        return runs[0] if runs else None

    def log_job(self, record: LineageRecord, loss_png: bytes | None = None) -> TrackedRun:
        """The job's run, logged from its (terminal) lineage record; see the module docstring."""
        from mlflow.entities import Metric, Param

        experiment_id = self.experiment_id()
        earlier = self.find_run(experiment_id, record.job)
        if earlier is not None and earlier.info.status == "FINISHED":
            return TrackedRun(tracking_uri=redact_url(self.tracking_uri), experiment_id=experiment_id,
                              run_id=earlier.info.run_id, reused=True)
        if earlier is not None:
            self.client.delete_run(earlier.info.run_id)
        run = self.client.create_run(experiment_id, tags=run_tags(record), run_name=record.job)
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        history = step_metrics(record.loss_history)
        last_step = max((s for _, _, s in history), default=0)
        metrics = [Metric(k, v, now, s) for k, v, s in history]
        metrics += [Metric(k, v, now, last_step) for k, v in final_metrics(record.metrics).items()]
        params = [Param(k, v) for k, v in run_params(record).items()]
        self.client.log_batch(run_id, metrics=metrics[:_BATCH], params=params[:100])
        for i in range(_BATCH, len(metrics), _BATCH):
            self.client.log_batch(run_id, metrics=metrics[i:i + _BATCH])
        for i in range(100, len(params), 100):
            self.client.log_batch(run_id, params=params[i:i + 100])
        self._log_input(run_id, record)
        if loss_png:
            self._log_png(run_id, "loss.png", loss_png)
        self.client.set_terminated(run_id, "FINISHED" if record.status == "succeeded" else "FAILED")
        return TrackedRun(tracking_uri=redact_url(self.tracking_uri), experiment_id=experiment_id,
                          run_id=run_id)

    def _log_input(self, run_id: str, record: LineageRecord) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        if not record.dataset_manifest:
            return
        dataset = MetaDataset(source=resolve_dataset_source(record.dataset_manifest),
                              name=f"{record.dataset}@{record.version}",
                              digest=(record.dataset_manifest_sha256 or record.version)[:32])
        self.client.log_inputs(run_id, [DatasetInput(
            dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "train")])])

    def _log_png(self, run_id: str, name: str, png: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="sftflow-mlflow-") as tmp:
            path = Path(tmp) / name
            path.write_bytes(png)
            self.client.log_artifact(run_id, str(path))


def track_job(settings: Settings, record: LineageRecord) -> dict[str, Any] | None:
    """Log the job to MLflow when tracking is configured (with the loss curves drawn by
    ``loss_plot`` when its history has losses): ``None`` when it is off, the
    :class:`TrackedRun` as a dict, or ``{"error": ...}`` when the tracker failed (the model is
    trained: a tracker that is down costs the run its tracking, not its result). An HTTP
    server that does not answer is given ``settings.mlflow.deadline_s``, not MLflow's own
    minutes of retries."""
    try:
        tracker = MlflowTracker.from_settings(settings)
    except ImportError:
        return {"tracking_uri": redact_url(settings.mlflow.tracking_uri),
                "error": "mlflow-skinny is not installed (pip install 'sftflow[tracking]')"}
    if tracker is None:
        return None
    has_loss = any("loss" in row or "eval_loss" in row for row in record.loss_history)
    try:
        tracker.check_reachable()
        return tracker.log_job(record, loss_curve_png(record.loss_history) if has_loss else None).model_dump()
    except Exception as err:  # noqa: BLE001 - reported in the lineage record and the log
        uri, safe = tracker.tracking_uri, redact_url(tracker.tracking_uri)
        return {"tracking_uri": safe, "error": f"{type(err).__name__}: {err}".replace(uri, safe)[:500]}


def metric_history(client: MlflowClient, run_id: str, key: str) -> Sequence[tuple[int, float]]:
    """``(step, value)`` of one metric of a run, in step order (for readers and tests)."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


track_job_task = io_task(name="mlflow-track-job", retries=0)(track_job)
