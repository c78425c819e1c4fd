"""``sftflow finetune``, ``sftflow models list|show|reproduce`` and ``sftflow trainer deploy``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from sftflow.cli._app import JsonOption, app, console, parse_params, print_json
from sftflow.core.settings import get_settings
from sftflow.tasks.adapters.clients import Clients, prefect_api

if TYPE_CHECKING:
    from sftflow.tasks.finetune.lineage import LineageRecord

models_app = typer.Typer(help="Fine-tuned models and their lineage: list, show, reproduce.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")
trainer_app = typer.Typer(help="The train-trl deployment on a work pool.", no_args_is_help=True)
app.add_typer(trainer_app, name="trainer")

BucketOption = typer.Option(None, "--bucket", help="Bucket of datasets and models (default: settings).")


@app.command("finetune")
def finetune_cmd(
    dataset: str = typer.Option(..., "--dataset", "-d", help="NAME or NAME@VERSION (or @TAG)."),
    backend: str = typer.Option(None, "--backend", help="trl | openai (default: settings)."),
    base_model: str = typer.Option(..., "--base-model", help="Hub id, s3:// prefix or folder; model name (openai)."),
    method: str = typer.Option("lora", "--method", help="lora | full."),
    epochs: float = typer.Option(1.0, "--epochs"),
    max_steps: int = typer.Option(-1, "--max-steps", help="-1: epochs decide."),
    learning_rate: float = typer.Option(2e-4, "--learning-rate"),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_length: int = typer.Option(1024, "--max-length"),
    seed: int = typer.Option(42, "--seed"),
    loss: str = typer.Option("completion", "--loss", help="trl: completion | assistant (the template's "
                             "{% generation %} markers)."),
    min_train_rows: int = typer.Option(10, "--min-train-rows", help="Gate: minimum train rows."),
    min_eval_rows: int = typer.Option(1, "--min-eval-rows", help="Gate: minimum eval rows."),
    deadline: float = typer.Option(6 * 3600, "--deadline", help="Seconds to watch the job."),
    poll_interval: float = typer.Option(
        2.0, "--poll-interval", min=0.05, help="First pause between job status polls (then backoff)."
    ),
    local: bool = typer.Option(False, "--local", help="trl: train in this process, no work pool."),
    bucket: str = BucketOption,
    as_json: bool = JsonOption,
) -> None:
    """Train on a dataset version, watch the job to the end, and record its lineage."""
    from sftflow.flows.finetune import FinetuneParams, finetune

    params = parse_params(
        FinetuneParams, "finetune",
        dataset=dataset, backend=backend, base_model=base_model, method=method,
        hyperparameters={"epochs": epochs, "max_steps": max_steps,
                         "learning_rate": learning_rate, "batch_size": batch_size,
                         "max_length": max_length, "seed": seed, "loss": loss},
        min_train_rows=min_train_rows, min_eval_rows=min_eval_rows, deadline_s=deadline,
        poll_min_s=poll_interval, bucket=bucket,
    )
    if local:
        import os

        os.environ["SFTFLOW_FINETUNE__TRL_MODE"] = "local"
        get_settings.cache_clear()
    with prefect_api(get_settings()):
        report = finetune(params)
    if as_json:
        print_json(report.model_dump(mode="json"))
        return
    verb = "reused earlier job" if report.reused else report.status
    console.print(f"{report.job}: {verb} ({report.backend} on {report.dataset}@{report.version})",
                  highlight=False)
    for key in ("eval_loss", "train_loss", "baseline_eval_loss"):
        if key in report.metrics:
            console.print(f"  {key}: {report.metrics[key]:.4f}", highlight=False)
    if report.eval_gate:
        console.print(f"  eval gate: {report.eval_gate['decision']} ({report.eval_gate['reason']})",
                      highlight=False)
    if report.fine_tuned_model:
        console.print(f"  fine_tuned_model: {report.fine_tuned_model}", highlight=False)
    if report.artifacts.get("model"):
        console.print(f"  model: {report.artifacts['model']}", highlight=False)
    console.print(f"  lineage: {report.lineage_uri}", highlight=False)


def _s3(bucket: str | None):
    clients = Clients.for_bucket(bucket)
    return clients.s3, clients.settings.finetune.models_prefix


def _row(rec: LineageRecord, best: set[str]) -> dict[str, Any]:
    return {
        "job": rec.job, "dataset": rec.dataset, "version": rec.version,
        "backend": rec.backend, "base_model": rec.base_model, "method": rec.method,
        "status": rec.status, "eval_loss": rec.metrics.get("eval_loss"),
        "fine_tuned_model": rec.fine_tuned_model, "best": rec.job in best,
        "submitted_at": rec.submitted_at,
    }


@models_app.command("list")
def list_cmd(
    dataset: str = typer.Option(None, "--dataset", "-d", help="Only models of this dataset."),
    bucket: str = BucketOption,
    as_json: bool = JsonOption,
) -> None:
    """Every fine-tuned model with its dataset version, status and eval loss."""
    from sftflow.tasks.finetune import lineage

    s3, prefix = _s3(bucket)
    records = lineage.list_records(s3, prefix, dataset)
    best = {lineage.read_model_ref(s3, prefix, d)[0] for d in {r.dataset for r in records}}
    rows = [_row(r, best) for r in records]
    if as_json:
        print_json(rows)
        return
    table = Table("job", "dataset@version", "backend", "base model", "status", "eval loss", "best")
    for r in rows:
        loss = f"{r['eval_loss']:.4f}" if isinstance(r["eval_loss"], float) else ""
        table.add_row(r["job"], f"{r['dataset']}@{r['version']}", r["backend"], r["base_model"],
                      r["status"], loss, "best" if r["best"] else "")
    console.print(table)
    console.print(f"{len(rows)} model(s) under {s3.uri(prefix)}/", highlight=False)


@models_app.command("show")
def show_cmd(
    job: str = typer.Argument(..., help="Job name (ft-...)."),
    bucket: str = BucketOption,
    as_json: bool = JsonOption,
) -> None:
    """The full lineage record of one model."""
    from sftflow.tasks.finetune import lineage

    s3, prefix = _s3(bucket)
    record = lineage.load_record(s3, prefix, job)
    rec = {**record.to_dict(), "best": lineage.read_model_ref(s3, prefix, record.dataset)[0] == job}
    if as_json:
        print_json(rec)
        return
    for key in ("job", "status", "dataset", "version", "dataset_manifest", "dataset_manifest_sha256",
                "base_model", "method", "backend", "backend_job_id", "submitted_at", "finished_at",
                "fine_tuned_model", "error", "dataset_tag", "best"):
        if rec.get(key) not in (None, ""):
            console.print(f"{key:>24}: {rec[key]}", highlight=False)
    for section in ("hyperparameters", "metrics", "artifacts", "eval_gate", "training_record"):
        if rec.get(section):
            console.print(f"{section}:", highlight=False)
            for k, v in rec[section].items():
                console.print(f"{k:>24}: {v}", highlight=False)


@models_app.command("reproduce")
def reproduce_cmd(
    job: str = typer.Argument(..., help="Job name (ft-...) of a trl job."),
    bucket: str = BucketOption,
    as_json: bool = JsonOption,
) -> None:
    """Re-tokenise a job's training rows from its dataset version and record; exit 0 when the
    token stream is identical, 1 when it differs (naming the first differing batch)."""
    import tempfile
    from pathlib import Path

    from sftflow.tasks.finetune.reproduce import reproduce, summary

    clients = Clients.for_bucket(bucket)
    settings = clients.settings
    with tempfile.TemporaryDirectory(prefix=f"sftflow-reproduce-{job}-") as workdir:
        result = reproduce(clients.s3, settings.finetune.models_prefix, settings.datasets.prefix, job,
                           Path(workdir))
    if as_json:
        print_json(result.model_dump(mode="json"))
    else:
        for line in summary(result):
            console.print(line, highlight=False)
    if not result.identical:
        raise typer.Exit(1)


@trainer_app.command("deploy")
def deploy_cmd(
    pool: str = typer.Option(None, "--pool", help="Process work pool (default: settings)."),
    as_json: bool = JsonOption,
) -> None:
    """Register train-trl on a process work pool (created if missing) of the Prefect API."""
    from sftflow.deployments.trainer import deploy_train_trl

    settings = get_settings()
    pool = pool or settings.finetune.train_work_pool
    flow_name, _, name = settings.finetune.trl_deployment.partition("/")
    with prefect_api(settings) as api:
        dep_id = deploy_train_trl(pool, name or "default")
    out = {"deployment": f"{flow_name}/{name or 'default'}", "id": dep_id, "work_pool": pool, "api": api}
    if as_json:
        print_json(out)
        return
    console.print(f"deployed {out['deployment']} ({dep_id}) on pool {pool} at {api}", highlight=False)
    console.print(f"start a worker: prefect worker start --pool {pool} --type process", highlight=False)
