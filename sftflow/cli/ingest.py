"""``sftflow ingest``: run the ingest flow on an S3 prefix and print what happened."""

from __future__ import annotations

import typer

from sftflow.cli._app import JsonOption, app, console, parse_params, print_json
from sftflow.core.settings import get_settings
from sftflow.tasks.adapters.clients import prefect_api

_KEEP_FIELD = typer.Option(
    None, "--keep-field", help="Record field copied into the task data (repeatable)."
)


@app.command("ingest")
def ingest(
    source: str = typer.Argument(..., help="s3://bucket/prefix holding the prompt files."),
    project: str = typer.Option(..., "--project", "-p", help="Label Studio project title or id."),
    prompt_field: str = typer.Option("prompt", "--prompt-field", help="Field with the prompt."),
    input_field: str = typer.Option(
        None, "--input-field", help="Optional field joined to the prompt (Alpaca: 'input')."
    ),
    keep_field: list[str] = _KEEP_FIELD,
    batch_size: int = typer.Option(10_000, "--batch-size", min=1, help="Tasks per import."),
    max_files: int = typer.Option(None, "--max-files", min=1, help="New objects per run."),
    max_records: int = typer.Option(None, "--max-records", min=1, help="Records per run."),
    no_create: bool = typer.Option(False, "--no-create", help="Fail if the project is missing."),
    near_threshold: float = typer.Option(
        1.0, "--near-duplicate-threshold", min=0.01, max=1.0,
        help="Quarantine prompts this similar to one in the project (estimated Jaccard).",
    ),
    no_near: bool = typer.Option(
        False, "--no-near-duplicates", help="Do not check new prompts for near-duplicates."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Import every new prompt under SOURCE into the project, exactly once."""
    from sftflow.flows.ingest import IngestParams, ingest_prompts

    params = parse_params(
        IngestParams, "ingest",
        source=source, project=project, batch_size=batch_size, max_files=max_files,
        max_records=max_records, create_project=not no_create,
        near_duplicates=not no_near, near_duplicate_threshold=near_threshold,
        fields={"prompt_field": prompt_field, "input_field": input_field,
                "keep_fields": keep_field or []},
    )
    with prefect_api(get_settings()):
        report = ingest_prompts(params)
    if as_json:
        print_json(report.model_dump(mode="json"))
        return
    console.print(
        f"[bold]{report.source}[/bold] -> project {report.project!r} (id {report.project_id})\n"
        f"files: {report.files_read} read, {report.files_unchanged} unchanged, "
        f"{report.files_quarantined} quarantined\n"
        f"records: {report.records} = [green]{report.imported} imported[/green] + "
        f"{report.duplicate} duplicate + [yellow]{report.quarantined} quarantined[/yellow]"
        + (f" ({', '.join(f'{k}: {v}' for k, v in report.reasons.items())})"
           if report.reasons else "")
        + f"\n{report.elapsed_s:.1f} s, {report.prompts_per_s:,.0f} prompts/s; "
        f"project now has {report.task_number} tasks",
        highlight=False,
    )
