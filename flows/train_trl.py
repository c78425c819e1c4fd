"""Flow ``train-trl``: supervised fine-tuning of one job with TRL, where the GPUs are.

Trigger: the ``finetune`` flow's ``trl`` backend, through ``run_deployment`` of the deployment
``train-trl/<name>`` on a work pool (a process pool locally, registered by
``deployments/trainer.py``; Kubernetes or Docker pools with GPU job variables in production, see
``infra/k8s/``). With ``finetune.trl_mode = "local"`` the ``finetune`` flow calls it in-process
instead (demo, no worker).

Inputs: one :class:`~tasks.finetune.backends.JobSpec`: the dataset version's parquet files
(s3:// URIs, read with ``datasets`` through fsspec), base model (hub id, s3:// prefix or local
folder), method (full or LoRA), hyperparameters, output prefix, and optionally a baseline model
to evaluate on the same eval split (the eval gate).

Outputs: ``<output_uri>/model/`` (the full model, or the LoRA adapter, with its tokenizer) and
``<output_uri>/result.json`` (:class:`~tasks.finetune.trl_job.TrainResult`: status, metrics incl.
``eval_loss``, ``baseline_eval_loss``, the training format and the length check's counts, loss
history per step, notes, artifact URIs), ``<output_uri>/loss.png`` (train and eval loss curves);
Prefect artifacts: the loss curves as an image, the loss table, sample outputs (three eval
prompts answered by the new model beside the baseline, the dataset's previous best) and a summary.

Idempotency: a rerun of a job whose ``result.json`` says ``succeeded`` returns that result
without training again; a rerun after a crash trains again and overwrites the same keys.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

from sftflow.core.clock import utc_now_iso
from sftflow.tasks.adapters.clients import Clients
from sftflow.tasks.drafts.samples import sample_outputs_task
from sftflow.tasks.finetune.backends import JobSpec
from sftflow.tasks.finetune.loss_plot import loss_curve_png_task
from sftflow.tasks.finetune.training import base_model_kind_task, train_sft_task
from sftflow.tasks.finetune.trl_job import (
    TrainResult,
    read_result_task,
    result_uri,
    upload_loss_plot_task,
    upload_model_task,
    write_result_task,
)
from sftflow.tasks.runtime.declare import artifact_key

FLOW_NAME = "train-trl"


@flow(name=FLOW_NAME, flow_run_name="train {params.dataset}@{params.version} job {params.job}", log_prints=False)
def train_trl(params: JobSpec) -> TrainResult:
    """Train one job with TRL SFTTrainer and upload the model and its result to S3
    (a job whose result says succeeded is returned without training again)."""
    logger = get_run_logger()
    s3 = Clients().s3
    earlier = read_result_task(s3, result_uri(params))
    if earlier and earlier.status == "succeeded":
        logger.info("job %s already trained: %s", params.job, result_uri(params))
        return earlier

    base_model_kind_task(s3, params.base_model)
    started = utc_now_iso()
    with tempfile.TemporaryDirectory(prefix=f"sftflow-{params.job}-") as workdir:
        try:
            trained = train_sft_task(s3, params, Path(workdir))
        except Exception as err:
            write_result_task(s3, params, TrainResult.failed(params, started, err))
            raise
        files = upload_model_task(s3, params, trained["model_dir"])
        samples = sample_outputs_task(s3, params, trained["model_dir"], Path(workdir))
    for note in trained["notes"]:
        logger.warning("%s: %s", params.job, note)
    png = loss_curve_png_task(trained["history"])
    result = TrainResult.succeeded(params, started, trained, files, upload_loss_plot_task(s3, params, png))
    write_result_task(s3, params, result)
    _publish(params, result, png, samples)
    logger.info("trained %s: %s", params.job, result.metrics)
    return result


def _publish(spec: JobSpec, result: TrainResult, png: bytes, samples: list[dict[str, str]]) -> None:
    """The loss curves (an image artifact: the PNG inline as a data: URL, the S3 copy is not
    reachable from a browser), the loss table, sample outputs of the new and previous model on
    eval prompts, and the summary as Prefect artifacts."""
    key = artifact_key("train", spec.job)
    image = "data:image/png;base64," + base64.b64encode(png).decode()
    create_image_artifact(image_url=image, key=f"{key}-loss-curve",
                          description=f"Train (blue) and eval (orange) loss per step of {spec.job}")
    if result.history:
        create_table_artifact(key=f"{key}-loss", table=result.history,
                              description=f"Training and eval loss of {spec.job} ({spec.dataset}@{spec.version})")
    if samples:
        create_table_artifact(key=f"{key}-samples", table=samples,
                              description=f"Eval prompts answered by {spec.job} and the previous model")
    m = result.metrics or {}
    lines = [
        f"# {spec.job}: {spec.method} fine-tune of `{spec.base_model}`",
        (f"Dataset `{spec.dataset}@{spec.version}`: {m.get('train_rows')} train rows, "
         f"{m.get('eval_rows')} eval rows."),
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in m.items()],
        "",
        *[f"- {note}" for note in result.notes or []],
        "",
        f"![train (blue) and eval (orange) loss per step]({image})",
        "",
        (f"Model: `{(result.artifacts or {}).get('model')}`; loss curves: "
         f"`{(result.artifacts or {}).get('loss_plot')}`"),
    ]
    create_markdown_artifact(key=key, markdown="\n".join(lines), description="Fine-tune summary")
