"""``sftflow webhooks serve`` (the event bridge) and ``sftflow labelstudio register-webhook``."""

from __future__ import annotations

import typer

from sftflow.cli._app import JsonOption, app, console, print_json
from sftflow.core.errors import ConfigError
from sftflow.core.settings import get_settings, resolve_secret
from sftflow.tasks.adapters.clients import prefect_api

webhooks_app = typer.Typer(help="The event bridge: webhooks in, Prefect events out.")
app.add_typer(webhooks_app, name="webhooks")
labelstudio_app = typer.Typer(help="Label Studio administration.")
app.add_typer(labelstudio_app, name="labelstudio")


@webhooks_app.command("serve")
def serve(
    host: str = typer.Option(None, help="Bind address (default: settings.webhooks.host)."),
    port: int = typer.Option(None, help="Port (default: settings.webhooks.port)."),
) -> None:
    """Run the bridge: POST /labelstudio, POST /s3, GET /health (blocks until Ctrl-C)."""
    import uvicorn

    from sftflow.bridge import create_app

    settings = get_settings()
    host = host or settings.webhooks.host
    port = port or settings.webhooks.port
    settings.webhooks.check_bind(
        host, resolve_secret(settings.webhooks.secret, settings.webhooks.secret_block))
    with prefect_api(settings) as api_url:
        app_ = create_app(settings)
        console.print(f"event bridge on http://{host}:{port} -> Prefect {api_url}")
        uvicorn.run(app_, host=host, port=port, log_level="info")


@labelstudio_app.command("register-webhook")
def register_webhook(
    project: str = typer.Option(..., "--project", help="Label Studio project title or id."),
    url: str = typer.Option(..., "--url", help="The bridge's /labelstudio URL."),
    min_new: int = typer.Option(None, "--min-new", min=1, help="Threshold for builds."),
    dataset: str = typer.Option(None, "--dataset", help="Dataset whose last version is the baseline."),
    count: str = typer.Option("tasks", "--count", help="'tasks' or 'annotations'."),
    as_json: bool = JsonOption,
) -> None:
    """Register (or update) the project's webhook with the shared-secret header."""
    from sftflow.tasks.adapters.clients import Clients
    from sftflow.tasks.adapters.labelstudio import require_project
    from sftflow.tasks.triggers.webhooks import BadRequest, ThresholdQuery, webhook_url
    from sftflow.tasks.triggers.webhooks import register_webhook as register

    settings = get_settings()
    secret = resolve_secret(settings.webhooks.secret, settings.webhooks.secret_block)
    if not secret:
        raise ConfigError("webhook secret is not set (SFTFLOW_WEBHOOKS__SECRET)")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--url must be an http(s) URL, not {url!r}")
    try:
        query = ThresholdQuery.from_query(
            {"min_new": str(min_new or ""), "dataset": dataset or "", "count": count}
        )
    except BadRequest as err:
        raise ConfigError(str(err)) from err
    client = Clients(settings).labelstudio
    found = require_project(client, project)
    result = register(client, int(found.id), webhook_url(url, query), secret)
    if as_json:
        print_json(result)
    else:
        verb = "registered" if result["created"] else "updated"
        console.print(f"{verb} webhook {result['webhook_id']} of project {found.id} -> {result['url']}")
