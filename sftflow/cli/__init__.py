"""The ``sftflow`` command line.

Every command that reports something takes ``--json``; failures print one line naming what
failed and where, and exit non-zero (``--debug`` anywhere on the line shows the traceback).
Each command group lives in its own module below and registers itself on ``app``.
"""

from __future__ import annotations

import sys

import typer

# Command modules register their commands on `app` when imported.
from sftflow.cli import (  # noqa: F401
    datasets,
    demo,
    drafts,
    finetune,
    ingest,
    pipeline,
    stack,
    waiting,
    webhooks,
)
from sftflow.cli._app import app, console_err
from sftflow.core.errors import SftflowError


def main() -> None:
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        rc = app(standalone_mode=False)  # click returns an Exit's code instead of raising
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except SftflowError as err:
        if debug:
            raise
        console_err.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        console_err.print("aborted")
        sys.exit(130)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except Exception as err:
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if debug:
            raise
        console_err.print(
            f"[red]error:[/red] {type(err).__name__}: {err} (rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
