"""The typer application and output helpers shared by every command module."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console

app = typer.Typer(
    name="sftflow",
    help="Prompts in S3 -> Label Studio -> versioned SFT datasets -> fine-tuning jobs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(emoji=False)
console_err = Console(stderr=True, emoji=False)

JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.")


def print_json(data: Any) -> None:
    """JSON on stdout. Callers pass data without secrets (settings go through ``redacted()``)."""
    typer.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))
