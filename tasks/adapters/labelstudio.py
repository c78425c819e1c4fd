"""Label Studio: the one thin client (label-studio-sdk 2.x) and the helpers flows share.

``build_labelstudio`` accepts a legacy API token or a personal access token (a JWT refresh
token: the SDK detects it and refreshes short-lived access tokens itself).
"""

from __future__ import annotations

import functools
import ssl
from typing import Any

import httpx
from label_studio_sdk import LabelStudio

from sftflow.core.errors import ConfigError, ServiceUnavailable
from sftflow.core.settings import LabelStudioSettings, resolve_secret
from sftflow.core.urls import redact_url


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for the process (httpx's default: certifi's CAs). httpx builds a new one
    for every client otherwise, loading the CA bundle each time (about 20 ms of CPU)."""
    return httpx.create_ssl_context()


def build_labelstudio(settings: LabelStudioSettings) -> LabelStudio:
    """The one place a Label Studio client is built from settings."""
    api_key = resolve_secret(settings.api_key, settings.api_key_block)
    if not api_key:
        raise ConfigError(
            "Label Studio API key is not set (SFTFLOW_LABELSTUDIO__API_KEY or "
            "SFTFLOW_LABELSTUDIO__API_KEY_BLOCK)"
        )
    client = httpx.Client(timeout=settings.timeout_s, follow_redirects=True, verify=_tls())
    return LabelStudio(base_url=settings.url.rstrip("/"), api_key=api_key, timeout=settings.timeout_s,
                       httpx_client=client)


def labelstudio_health(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """``GET /health`` -> ``{"status": "UP"}``; raises ServiceUnavailable otherwise (naming
    the URL without credentials)."""
    where = redact_url(url)
    try:
        resp = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s, verify=_tls())
        resp.raise_for_status()
        body = resp.json()
    except (httpx.HTTPError, ValueError) as err:
        raise ServiceUnavailable(f"Label Studio at {where}: {err}") from err
    if body.get("status") != "UP":
        raise ServiceUnavailable(f"Label Studio at {where}: health says {body}")
    return body


def check_labelstudio_auth(client: LabelStudio, url: str) -> str:
    """The e-mail of the token's user; a clear error when the token is refused."""
    from label_studio_sdk.core.api_error import ApiError

    where = redact_url(url)
    try:
        return str(client.users.whoami().email)
    except ApiError as err:
        if err.status_code in (401, 403):
            raise ConfigError(
                f"Label Studio at {where} refused the API key ({err.status_code}): {err.body}"
            ) from err
        raise ServiceUnavailable(f"Label Studio at {where}: {err}") from err
    except httpx.HTTPError as err:
        raise ServiceUnavailable(f"Label Studio at {where}: {err}") from err


# -- projects ------------------------------------------------------------------------------------
#: The Supervised LLM Fine-tuning template: the prompt above a required text area.
PROMPT_NAME = "prompt"  # <Text name=...> showing task data["prompt"]
RESPONSE_NAME = "instruction"  # <TextArea name=...>: the template's name for the response


def find_project(client: LabelStudio, project: str | int) -> Any | None:
    """A project by numeric id or exact title; None when there is none.

    A title shared by several projects is an error (never guess which one is meant).
    """
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(project, int) or str(project).isdigit():
        try:
            return client.projects.get(id=int(project))
        except ApiError as err:
            if err.status_code == 404:
                return None
            raise
    matches = [p for p in client.projects.list(title=str(project)) if p.title == str(project)]
    if len(matches) > 1:
        ids = ", ".join(str(p.id) for p in matches)
        raise ConfigError(f"several Label Studio projects are titled {project!r} (ids {ids}); pass an id")
    return matches[0] if matches else None


def require_project(client: LabelStudio, project: str | int) -> Any:
    """Like ``find_project`` but a missing project is a clear error naming it."""
    found = find_project(client, project)
    if found is None:
        raise ConfigError(f"Label Studio project {project!r} does not exist")
    return found
