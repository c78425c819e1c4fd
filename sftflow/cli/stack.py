"""``sftflow stack up | status | down | logs``: the local stack on loopback."""

from __future__ import annotations

from dataclasses import asdict

import typer
from rich.table import Table

from sftflow.cli._app import JsonOption, app, console, print_json
from sftflow.core.errors import SftflowError
from sftflow.core.settings import get_settings
from sftflow.infra.services import ALL_SERVICES
from sftflow.infra.stack import LocalStack

stack_app = typer.Typer(help="Start, inspect and stop the local stack (S3, Label Studio, Prefect; "
                             "optionally PostgreSQL).")
app.add_typer(stack_app, name="stack")

ServicesArg = typer.Argument(
    None, help=f"Services (default all; postgres only with --postgres): {', '.join(ALL_SERVICES)}."
)


def _names(services: list[str] | None) -> list[str] | None:
    """The services named, checked; None (the stack's default set) when none are."""
    unknown = [n for n in services or [] if n not in ALL_SERVICES]
    if unknown:
        raise SftflowError(f"unknown service {unknown[0]!r}; choose from {', '.join(ALL_SERVICES)}")
    return services or None


def _print_status(statuses, as_json: bool) -> None:
    if as_json:
        print_json({"services": [asdict(s) for s in statuses],
                    "healthy": all(s.healthy for s in statuses)})
        return
    table = Table("service", "url", "health", "pid", "log")
    for s in statuses:
        health = "[green]healthy[/green]" if s.healthy else f"[red]{s.state}[/red] {s.detail}"
        table.add_row(s.name, s.url, health, str(s.pid or "-"), s.log)
    console.print(table)


@stack_app.command("up")
def up(
    services: list[str] | None = ServicesArg,
    timeout: float = typer.Option(None, help="Seconds to wait for health (default from settings)."),
    postgres: bool = typer.Option(
        False, "--postgres",
        help="Run Label Studio and the Prefect server on PostgreSQL, started as a fourth service "
             "(as SFTFLOW_STACK__POSTGRES=true).",
    ),
    as_json: bool = JsonOption,
) -> None:
    """Start the services (reusing running ones) and wait until they are healthy."""
    settings = get_settings()
    if postgres:
        settings = settings.model_copy(
            update={"stack": settings.stack.model_copy(update={"postgres": True})})
    stack = LocalStack(settings)
    _print_status(stack.up(_names(services), timeout_s=timeout), as_json)


@stack_app.command("status")
def status(services: list[str] | None = ServicesArg, as_json: bool = JsonOption) -> None:
    """Each service's URL, health and pid. Exit code 1 if any is unhealthy."""
    statuses = LocalStack(get_settings()).status(_names(services))
    _print_status(statuses, as_json)
    if not all(s.healthy for s in statuses):
        raise typer.Exit(1)


@stack_app.command("down")
def down(services: list[str] | None = ServicesArg, as_json: bool = JsonOption) -> None:
    """Stop exactly the processes this stack started (by their pid files)."""
    stopped = LocalStack(get_settings()).down(_names(services))
    if as_json:
        print_json({"stopped": stopped})
    else:
        console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@stack_app.command("logs")
def logs(
    service: str = typer.Argument(..., help=f"One of {', '.join(ALL_SERVICES)}."),
    lines: int = typer.Option(50, "-n", help="How many lines from the end."),
) -> None:
    """The end of a service's log file."""
    stack = LocalStack(get_settings())
    _names([service])
    typer.echo(f"==> {stack.log_path(service)}")
    typer.echo(stack.tail_log(service, lines))


def _check_prefect(settings) -> dict:
    """The Prefect API answers, its scheduler creates the runs of scheduled deployments, and
    (for the local stack's server) its services log no errors."""
    import httpx

    from sftflow.core.errors import ServiceUnavailable
    from sftflow.tasks.adapters.clients import prefect_api
    from sftflow.tasks.adapters.prefect import unscheduled_deployments

    with prefect_api(settings) as api_url:
        try:
            httpx.get(f"{api_url.rstrip('/')}/health", timeout=10).raise_for_status()
        except httpx.HTTPError as err:
            raise ServiceUnavailable(f"Prefect at {api_url}: {err}") from err
        problems = [f"{name} has an active schedule but no upcoming run: the server's "
                    "scheduler is not creating runs" for name in unscheduled_deployments()]
    stack = LocalStack(settings)
    if api_url.rstrip("/") == stack.specs_url("prefect") + "/api":
        problems += [e.describe() for e in stack.prefect_service_errors()]
    if problems:
        raise ServiceUnavailable(f"Prefect at {api_url}: " + "; ".join(problems)[:600]
                                 + (f"; see {stack.log_path('prefect')}"
                                    if stack.log_path("prefect").exists() else ""))
    return {"url": api_url, "ok": True}


@app.command("check")
def check(as_json: bool = JsonOption) -> None:
    """Check the configured services: reachable, our credentials accepted, and the Prefect
    server's scheduler and event services working (not only answering)."""
    from sftflow.core.urls import redact_url
    from sftflow.tasks.adapters.clients import Clients
    from sftflow.tasks.adapters.labelstudio import check_labelstudio_auth, labelstudio_health

    settings = get_settings()
    clients = Clients(settings)
    clients.s3.ping()
    labelstudio_health(settings.labelstudio.url)
    user = check_labelstudio_auth(clients.labelstudio, settings.labelstudio.url)
    prefect = _check_prefect(settings)
    result = {
        "s3": {"endpoint": redact_url(settings.s3.endpoint_url or "aws"), "bucket": settings.s3.bucket,
               "ok": True},
        "labelstudio": {"url": redact_url(settings.labelstudio.url), "user": user, "ok": True},
        "prefect": prefect,
        "settings": settings.redacted(),
    }
    if as_json:
        print_json(result)
    else:
        console.print(f"S3 {result['s3']['endpoint']}: ok; Label Studio {result['labelstudio']['url']}: "
                      f"ok as {user}; Prefect {prefect['url']}: ok")
