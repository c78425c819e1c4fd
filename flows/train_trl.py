"""Flow ``train-trl``: supervised fine-tuning of one job with TRL, where the GPUs are.

Trigger: the ``finetune`` flow's ``trl`` backend, through ``run_deployment`` of the deployment
``train-trl/<name>`` on a work pool (a process pool locally; Kubernetes or Docker pools with GPU
job variables in production, see ``infra/k8s/``). With ``finetune.trl_mode = "local"`` the
``finetune`` flow calls it in-process instead (demo, no worker).

Inputs: one :class:`~tasks.finetune.backends.JobSpec`: the dataset version's parquet files
(s3:// URIs, read with ``datasets`` through fsspec), base model (hub id, s3:// prefix or local
folder), method (full or LoRA), hyperparameters, output prefix, and optionally a baseline model
to evaluate on the same eval split (the eval gate).

Outputs: ``<output_uri>/model/`` (the full model, or the LoRA adapter, with its tokenizer) and
``<output_uri>/result.json`` (status, metrics incl. ``eval_loss`` and ``baseline_eval_loss``,
loss history, artifact URIs); Prefect artifacts: the loss table and a summary.

Idempotency: a rerun of a job whose ``result.json`` says ``succeeded`` returns that result
without training again; a rerun after a crash trains again and overwrites the same keys.
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from sftflow.tasks._prefect import compute_task, io_task
from sftflow.tasks.clients import Clients
from sftflow.tasks.finetune.backends import JobSpec
from sftflow.tasks.finetune.files import read_json, upload_dir, write_json
from sftflow.tasks.finetune.training import base_model_kind, train_sft
from sftflow.tasks.storage import S3

FLOW_NAME = "train-trl"


def result_uri(spec: JobSpec) -> str:
    return f"{spec.output_uri.rstrip('/')}/result.json"


@io_task
def read_result(s3: S3, spec: JobSpec) -> dict[str, Any] | None:
    try:
        return read_json(s3, result_uri(spec))
    except KeyError:
        return None


@io_task(retries=1)
def check_base_model(s3: S3, base_model: str) -> str:
    return base_model_kind(s3, base_model)


@compute_task
def train(s3: S3, spec: JobSpec, workdir: str) -> dict[str, Any]:
    return train_sft(s3, spec, Path(workdir))


@io_task
def upload_model(s3: S3, model_dir: Path, uri: str) -> list[str]:
    return upload_dir(s3, model_dir, uri)


@io_task
def write_result(s3: S3, spec: JobSpec, result: dict[str, Any]) -> None:
    write_json(s3, result_uri(spec), result)


def _report(spec: JobSpec, result: dict[str, Any]) -> None:
    key = "train-" + "".join(c if c.isalnum() else "-" for c in spec.job.lower())
    if result["history"]:
        create_table_artifact(
            key=f"{key}-loss",
            table=result["history"],
            description=f"Training and eval loss of {spec.job} ({spec.dataset}@{spec.version})",
        )
    m = result["metrics"]
    lines = [
        f"# {spec.job}: {spec.method} fine-tune of `{spec.base_model}`",
        (f"Dataset `{spec.dataset}@{spec.version}`: {m.get('train_rows')} train rows, "
         f"{m.get('eval_rows')} eval rows."),
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in m.items()],
        "",
        f"Model: `{result['artifacts'].get('model')}`",
    ]
    create_markdown_artifact(key=key, markdown="\n".join(lines), description="Fine-tune summary")


@flow(name=FLOW_NAME, log_prints=True)
def train_trl(params: JobSpec) -> dict[str, Any]:
    """Train one job with TRL SFTTrainer and upload the model and its result to S3."""
    logger = get_run_logger()
    clients = Clients()
    s3 = clients.s3
    earlier = read_result(s3, params)
    if earlier and earlier.get("status") == "succeeded":
        logger.info("job %s already trained: %s", params.job, result_uri(params))
        return earlier

    check_base_model(s3, params.base_model)
    started = datetime.now(UTC).isoformat()
    with tempfile.TemporaryDirectory(prefix=f"sftflow-{params.job}-") as workdir:
        try:
            out = train(s3, params, workdir)
        except Exception as err:
            write_result(s3, params, {
                "job": params.job, "status": "failed", "started_at": started,
                "finished_at": datetime.now(UTC).isoformat(),
                "error": f"{type(err).__name__}: {err}",
            })
            raise
        model_uri = f"{params.output_uri.rstrip('/')}/model"
        files = upload_model(s3, out["model_dir"], model_uri)
    result = {
        "job": params.job,
        "status": "succeeded",
        "started_at": started,
        "finished_at": datetime.now(UTC).isoformat(),
        "metrics": out["metrics"],
        "history": out["history"],
        "artifacts": {
            "model": model_uri,
            "kind": "adapter" if params.method == "lora" else "model",
            "files": str(len(files)),
            "result": result_uri(params),
        },
    }
    write_result(s3, params, result)
    _report(params, result)
    logger.info("trained %s: %s", params.job, out["metrics"])
    return result


def deploy_train_trl(work_pool: str, name: str = "default", source: str | Path | None = None) -> str:
    """Register the training flow as ``train-trl/<name>`` on a process work pool.

    The pool is created when missing. ``source`` is the project folder the worker imports the
    flow from (default: this checkout); production pools use an image instead (``infra/k8s``).
    Returns the deployment id. Start a worker with ``prefect worker start --pool <work_pool>``.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(
                WorkPoolCreate(
                    name=work_pool,
                    type="process",
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                )
            )
        except ObjectAlreadyExists:
            pass
    root = Path(source) if source else Path(__file__).resolve().parents[1]
    deployable = train_trl.from_source(source=str(root), entrypoint="flows/train_trl.py:train_trl")
    dep_id = deployable.deploy(
        name=name,
        work_pool_name=work_pool,
        build=False,
        push=False,
        print_next_steps=False,
        description="TRL supervised fine-tuning of one sftflow job (see flows/train_trl.py).",
        tags=["sftflow", "train"],
    )
    return str(dep_id)
