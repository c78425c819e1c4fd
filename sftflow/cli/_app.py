"""The typer application and output helpers shared by every command module."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console

from sftflow.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

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


def parse_params(model_cls: type[M], command: str, **values: Any) -> M:
    """``model_cls(**values)``; an invalid value is a one-line ConfigError naming the command
    and the field (``build: filters.pii: Input should be 'drop', 'redact' or 'off'``)."""
    try:
        return model_cls(**values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "parameters"
        raise ConfigError(f"{command}: {where}: {first['msg']}") from None
    except ValueError as err:
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{command}: {line}") from None
