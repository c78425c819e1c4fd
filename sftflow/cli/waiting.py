"""``sftflow wait``: block until a project has enough new annotations, or a deadline passes."""

from __future__ import annotations

import typer

from sftflow.cli._app import JsonOption, app, console, parse_params, print_json
from sftflow.core.settings import get_settings
from sftflow.tasks.adapters.clients import prefect_api

#: Exit code when the deadline passed without enough annotations (not an error).
EXIT_NOT_ENOUGH = 2


@app.command("wait")
def wait(
    project: str = typer.Option(..., "--project", help="Label Studio project title or id."),
    min_new: int = typer.Option(..., "--min-new", min=1, help="New annotated tasks needed."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Give up after this many seconds."),
    dataset: str = typer.Option(None, "--dataset", help="Count since this dataset's last version."),
    count: str = typer.Option("tasks", "--count", help="'tasks' or 'annotations'."),
    min_interval: float = typer.Option(60.0, "--min-interval", help="Shortest pause (s)."),
    max_interval: float = typer.Option(600.0, "--max-interval", help="Longest pause (s)."),
    as_json: bool = JsonOption,
) -> None:
    """Poll the project's counters with backoff until enough new annotations exist.

    Exit code 0 when they do, 2 when the deadline passed first ("not enough annotations yet").
    """
    from sftflow.flows.wait_for_annotations import WaitParams, wait_for_annotations
    from sftflow.tasks.adapters.clients import Clients
    from sftflow.tasks.adapters.labelstudio import require_project

    settings = get_settings()
    params = parse_params(
        WaitParams, "wait", project=project, min_new=min_new, timeout_s=timeout, dataset=dataset,
        count=count, min_interval_s=min_interval, max_interval_s=max(max_interval, min_interval),
    )
    # A missing project fails here as one line, before a flow run logs a traceback.
    project_id = str(require_project(Clients(settings).labelstudio, project).id)
    params = params.model_copy(update={"project": project_id})
    with prefect_api(settings):
        report = wait_for_annotations(params)
    if as_json:
        print_json(report.model_dump(mode="json"))
    else:
        colour = "green" if report.reached else "yellow"
        console.print(f"[{colour}]{report.message}[/{colour}] "
                      f"({report.polls} polls, {report.waited_s:.0f} s)")
    if not report.reached:
        raise typer.Exit(EXIT_NOT_ENOUGH)
