"""``sftflow demo``: the whole loop on the project's own sample (see sftflow/demo/run.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from sftflow.cli._app import JsonOption, app, print_json
from sftflow.core.settings import get_settings

WorkdirOption = typer.Option(Path(".demo"), help="Where the tiny model and worker log go.")


@app.command("demo")
def demo(
    workdir: Path = WorkdirOption,
    as_json: bool = JsonOption,
) -> None:
    """Run ingest -> simulated annotation -> wait -> build -> fine-tune on the local stack."""
    from sftflow.demo.run import run_demo

    summary = run_demo(get_settings(), workdir)
    if as_json:
        print_json(summary)
