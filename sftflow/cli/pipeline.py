"""``sftflow run`` (the one-shot pipeline) and ``sftflow serve`` (the deployments, served here)."""

from __future__ import annotations

import typer

from sftflow.cli._app import JsonOption, app, console, parse_params, print_json
from sftflow.core.settings import get_settings
from sftflow.tasks.adapters.clients import prefect_api


@app.command("run")
def run(
    source: str = typer.Option(..., "--source", help="s3://bucket/prefix of the prompt files."),
    project: str = typer.Option(..., "--project", help="Label Studio project title or id."),
    dataset: str = typer.Option(..., "--dataset", help="Dataset name to build."),
    min_new: int = typer.Option(1, "--min-new", min=1, help="New annotated tasks to wait for."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Deadline of the wait (s)."),
    min_interval: float = typer.Option(60.0, "--min-interval", help="Shortest poll pause (s)."),
    base_model: str = typer.Option(None, "--base-model", help="Fine-tune it (default: no)."),
    backend: str = typer.Option(None, "--backend", help="Fine-tuning backend."),
    as_json: bool = JsonOption,
) -> None:
    """Ingest -> wait -> build -> fine-tune, as subflows of one run. Exit 2 if the wait timed out."""
    from sftflow.flows.pipeline import PipelineParams, sft_pipeline

    params = parse_params(
        PipelineParams, "run", source=source, project=project, dataset=dataset, min_new=min_new, wait_timeout_s=timeout,
        min_interval_s=min_interval, max_interval_s=max(600.0, min_interval),
        base_model=base_model, backend=backend,
    )
    with prefect_api(get_settings()):
        report = sft_pipeline(params)
    if as_json:
        print_json(report.model_dump(mode="json"))
    else:
        console.print(f"[bold]{report.stage}[/bold]: {report.message}")
    if report.wait is not None and not report.wait.get("reached"):
        raise typer.Exit(2)


@app.command("serve")
def serve(
    source: str = typer.Option(..., "--source", help="s3://bucket/prefix where prompts land."),
    project: str = typer.Option(..., "--project", help="Label Studio project title or id."),
    dataset: str = typer.Option(..., "--dataset", help="Dataset the builds write."),
    min_new: int = typer.Option(100, "--min-new", min=1, help="New annotated tasks per build."),
    ingest_cron: str = typer.Option("*/30 * * * *", "--ingest-cron", help="Catch-up ingest cron."),
    check_interval: int = typer.Option(900, "--check-interval", help="check-annotations (s)."),
    debounce: int = typer.Option(300, "--debounce", help="One build trigger per project per (s)."),
    base_model: str = typer.Option(None, "--base-model", help="Adds the finetune deployment."),
    backend: str = typer.Option(None, "--backend", help="Fine-tuning backend."),
    drafts: str = typer.Option("off", "--drafts",
                               help="Model drafts for annotators: off | transformers | openai."),
    limit: int = typer.Option(None, "--limit", help="Concurrent flow runs of this process."),
) -> None:
    """Register the deployments (schedules, triggers, concurrency) and run their flow runs here.

    Blocks until Ctrl-C. Run ``sftflow webhooks serve`` next to it to turn webhooks into events.
    """
    from sftflow.deployments.serve import ServeConfig
    from sftflow.deployments.serve import serve as serve_deployments

    cfg = parse_params(ServeConfig, "serve", source=source, project=project, dataset=dataset,
                       min_new=min_new, ingest_cron=ingest_cron,
                       check_interval_s=check_interval, debounce_s=debounce,
                       base_model=base_model, backend=backend, drafts=drafts)
    with prefect_api(get_settings()) as api_url:
        console.print(f"serving the sftflow deployments on {api_url}")
        serve_deployments(cfg, limit=limit)
