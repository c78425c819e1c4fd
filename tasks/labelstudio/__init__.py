"""Label Studio: the one thin client (label-studio-sdk 2.x) and the helpers flows share.

``build_labelstudio`` accepts a legacy API token or a personal access token (a JWT refresh
token: the SDK detects it and refreshes short-lived access tokens itself).
"""

from __future__ import annotations

from typing import Any

import httpx
from label_studio_sdk import LabelStudio

from sftflow.errors import ConfigError, ServiceUnavailable
from sftflow.settings import LabelStudioSettings, resolve_secret


def build_labelstudio(settings: LabelStudioSettings) -> LabelStudio:
    """The one place a Label Studio client is built from settings."""
    api_key = resolve_secret(settings.api_key, settings.api_key_block)
    if not api_key:
        raise ConfigError(
            "Label Studio API key is not set (SFTFLOW_LABELSTUDIO__API_KEY or "
            "SFTFLOW_LABELSTUDIO__API_KEY_BLOCK)"
        )
    return LabelStudio(base_url=settings.url.rstrip("/"), api_key=api_key, timeout=settings.timeout_s)


def labelstudio_health(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """``GET /health`` -> ``{"status": "UP"}``; raises ServiceUnavailable otherwise."""
    try:
        resp = httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s)
        resp.raise_for_status()
        body = resp.json()
    except (httpx.HTTPError, ValueError) as err:
        raise ServiceUnavailable(f"Label Studio at {url}: {err}") from err
    if body.get("status") != "UP":
        raise ServiceUnavailable(f"Label Studio at {url}: health says {body}")
    return body


def check_labelstudio_auth(client: LabelStudio, url: str) -> str:
    """The e-mail of the token's user; a clear error when the token is refused."""
    from label_studio_sdk.core.api_error import ApiError

    try:
        return str(client.users.whoami().email)
    except ApiError as err:
        if err.status_code in (401, 403):
            raise ConfigError(
                f"Label Studio at {url} refused the API key ({err.status_code}): {err.body}"
            ) from err
        raise ServiceUnavailable(f"Label Studio at {url}: {err}") from err
    except httpx.HTTPError as err:
        raise ServiceUnavailable(f"Label Studio at {url}: {err}") from err
