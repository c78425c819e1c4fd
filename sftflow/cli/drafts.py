"""``sftflow drafts``: a model's draft response on every open task, for annotators to edit."""

from __future__ import annotations

import typer

from sftflow.cli._app import JsonOption, app, console, parse_params, print_json
from sftflow.core.settings import get_settings
from sftflow.tasks.adapters.clients import prefect_api


@app.command("drafts")
def drafts(
    job: str = typer.Option(None, "--job", help="Fine-tune job whose model drafts."),
    dataset: str = typer.Option(None, "--dataset", help="Instead of --job: the dataset's best model."),
    project: str = typer.Option(None, "--project", help="Label Studio project, title or id "
                                "(default: the one the model's training data came from)."),
    generator: str = typer.Option("transformers", "--generator",
                                  help="transformers (the model itself) or openai (settings.drafts)."),
    any_model: bool = typer.Option(False, "--any-model",
                                   help="Draft even with a job that is not its dataset's best."),
    max_tasks: int = typer.Option(None, "--max-tasks", min=1, help="Draft at most this many tasks."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help="Longest draft."),
    as_json: bool = JsonOption,
) -> None:
    """Write the model's draft on every open task (no annotation, no draft of this model yet).

    Idempotent: a rerun drafts only the tasks still open; failures are counted per task."""
    from sftflow.flows.draft_responses import DraftParams, draft_responses

    params = parse_params(DraftParams, "drafts", job=job, dataset=dataset, project=project,
                          generator=generator, only_if_best=not any_model, max_tasks=max_tasks,
                          max_new_tokens=max_new_tokens)
    with prefect_api(get_settings()):
        report = draft_responses(params)
    if report is None:
        message = "the model is not its dataset's best: no drafts (--any-model drafts anyway)"
        if as_json:
            print_json({"drafted": 0, "message": message})
        else:
            console.print(f"[yellow]{message}[/yellow]")
        return
    if as_json:
        print_json(report.model_dump(mode="json"))
    else:
        console.print(report.summary())
