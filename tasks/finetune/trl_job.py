"""The files of one ``train-trl`` job under its output prefix: ``result.json``, ``model/`` and
``loss.png`` (the loss curves). ``result.json`` also holds the few-shot baseline the job
evaluated (or read from the cache under ``<models_prefix>/_few_shot/``, ``few_shot.py``).

The ``train-trl`` flow writes them; the ``trl`` backend reads ``result.json`` back (status of a
local run, metrics and artifacts of a finished one). A rerun of a job whose result says
``succeeded`` is not trained again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from sftflow.core.clock import utc_now_iso
from sftflow.tasks.adapters.s3 import S3, parse_s3_uri
from sftflow.tasks.finetune.backends import JobSpec
from sftflow.tasks.finetune.files import read_json, upload_dir, write_json
from sftflow.tasks.runtime.declare import io_task


class TrainResult(BaseModel):
    """``<output_uri>/result.json``: a failed run has ``error``, a succeeded one the rest."""

    job: str
    status: Literal["succeeded", "failed"]
    started_at: str
    finished_at: str
    error: str | None = None
    metrics: dict[str, Any] | None = None
    history: list[dict[str, Any]] | None = Field(
        None, description="Loss per logged step: step, epoch, loss, eval_loss, learning_rate, grad_norm.")
    notes: list[str] | None = Field(None, description="What the run decided for the data: "
                                    "format fallback, rows dropped for length.")
    artifacts: dict[str, str] | None = None
    training_record: dict[str, Any] | None = Field(
        None, description="What decided the token stream and its fingerprint (tokens.TokenRecord).")
    few_shot: dict[str, Any] | None = Field(
        None, description="The base model with k train rows in its prompt, on the same eval rows "
        "(few_shot.FewShotResult): the eval gate's third number.")

    @classmethod
    def failed(cls, spec: JobSpec, started_at: str, err: BaseException) -> TrainResult:
        return cls(job=spec.job, status="failed", started_at=started_at, finished_at=utc_now_iso(),
                   error=f"{type(err).__name__}: {err}")

    @classmethod
    def succeeded(cls, spec: JobSpec, started_at: str, trained: dict[str, Any],
                  model_files: list[str], loss_plot: str | None = None) -> TrainResult:
        artifacts = {
            "model": model_uri(spec),
            "kind": "adapter" if spec.method == "lora" else "model",
            "files": str(len(model_files)),
            "result": result_uri(spec),
        }
        if loss_plot:
            artifacts["loss_plot"] = loss_plot
        return cls(
            job=spec.job, status="succeeded", started_at=started_at, finished_at=utc_now_iso(),
            metrics=trained["metrics"], history=trained["history"],
            notes=trained.get("notes") or None, artifacts=artifacts,
            training_record=trained.get("training_record"), few_shot=trained.get("few_shot"),
        )


def result_uri(spec: JobSpec) -> str:
    return f"{spec.output_uri.rstrip('/')}/result.json"


def model_uri(spec: JobSpec) -> str:
    return f"{spec.output_uri.rstrip('/')}/model"


def loss_plot_uri(spec: JobSpec) -> str:
    return f"{spec.output_uri.rstrip('/')}/loss.png"


def read_result(s3: S3, uri: str) -> TrainResult | None:
    """The result at ``uri`` (``result_uri(spec)``), None when the job wrote none."""
    try:
        return TrainResult.model_validate(read_json(s3, uri))
    except KeyError:
        return None


def write_result(s3: S3, spec: JobSpec, result: TrainResult) -> None:
    write_json(s3, result_uri(spec), result.model_dump(mode="json", exclude_none=True))


def upload_model(s3: S3, spec: JobSpec, model_dir: Path) -> list[str]:
    """Upload the saved model or adapter to ``<output_uri>/model/``; returns the s3:// URIs."""
    return upload_dir(s3, model_dir, model_uri(spec))


def upload_loss_plot(s3: S3, spec: JobSpec, png: bytes) -> str:
    """Write the loss curves to ``<output_uri>/loss.png``; returns its s3:// URI."""
    uri = loss_plot_uri(spec)
    bucket, key = parse_s3_uri(uri)
    s3.put_bytes(key, png, bucket=bucket, content_type="image/png")
    return uri


read_result_task = io_task(name="read-train-result")(read_result)
write_result_task = io_task(name="write-train-result")(write_result)
upload_model_task = io_task(name="upload-model")(upload_model)
upload_loss_plot_task = io_task(name="upload-loss-plot")(upload_loss_plot)
