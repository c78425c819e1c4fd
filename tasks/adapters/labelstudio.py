"""Label Studio: the one thin client (label-studio-sdk 2.x) and the helpers flows share.

``build_labelstudio`` accepts a legacy API token or a personal access token (a JWT refresh
token: the SDK detects it and refreshes short-lived access tokens itself).
"""

from __future__ import annotations

import functools
import json
import ssl
from typing import TYPE_CHECKING, Any

import httpx
from label_studio_sdk.core.api_error import ApiError

from sftflow.core.errors import ConfigError, ServiceUnavailable
from sftflow.core.settings import LabelStudioSettings, resolve_secret
from sftflow.core.urls import redact_url

if TYPE_CHECKING:  # the SDK's client module imports ~1.4 s of modules (pandas, jsonschema,
    # jsf): only its type here; ``_client_class`` builds the client on the base client
    from label_studio_sdk import LabelStudio


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
    return _client_class()(base_url=settings.url.rstrip("/"), api_key=api_key,
                           timeout=settings.timeout_s, httpx_client=client)


@functools.cache
def _client_class() -> type:
    """The SDK's client as ``label_studio_sdk.LabelStudio`` behaves for what sftflow calls (its
    listings end at Label Studio's 404 past the last page; task listings default to
    ``fields=all``), built on the generated base client. ``LabelStudio`` itself imports its
    extensions' label-config interface (jsf, smart_open, Google auth): about 0.4 s of CPU in
    every process that builds a client, a build's included, for helpers sftflow never calls
    (``get_label_interface``, ``exports.as_pandas``)."""
    from label_studio_sdk._extensions.pager_ext import SyncPagerExt
    from label_studio_sdk.base_client import LabelStudioBase
    from label_studio_sdk.projects.client import ProjectsClient
    from label_studio_sdk.tasks.client import TasksClient

    class Projects(ProjectsClient):
        def list(self, **kwargs: Any) -> Any:
            return SyncPagerExt.from_sync_pager(super().list(**kwargs))

    class Tasks(TasksClient):
        def list(self, **kwargs: Any) -> Any:
            kwargs.setdefault("fields", "all")
            return SyncPagerExt.from_sync_pager(super().list(**kwargs))

    class Client(LabelStudioBase):
        @property
        def projects(self) -> Projects:
            if self._projects is None:
                self._projects = Projects(client_wrapper=self._client_wrapper)
            return self._projects

        @property
        def tasks(self) -> Tasks:
            if self._tasks is None:
                self._tasks = Tasks(client_wrapper=self._client_wrapper)
            return self._tasks

    return Client


def post_json(client: LabelStudio, path: str, body: Any, *, params: dict[str, Any] | None = None,
              timeout_s: float | None = None) -> Any:
    """POST ``body`` as JSON to ``path`` (e.g. ``api/projects/1/import``) with the client's
    connection, base URL and credentials; the decoded answer, or the SDK's ``ApiError`` for an
    answer outside 2xx (transport errors are httpx's, as from the SDK).

    For large bodies: the SDK walks every value of a request body twice in Python before
    encoding it (``jsonable_encoder`` and its annotation metadata pass: 3 s of a 55,000-task
    import, bench/ingest.py), where ``json.dumps`` encodes it in C. The encoding is httpx's own
    (UTF-8, compact, no NaN); a value ``json`` cannot encode (a datetime from a Parquet column)
    is converted as the SDK would."""
    from label_studio_sdk.core.jsonable_encoder import jsonable_encoder

    wrapper = client._client_wrapper  # the SDK's own auth and base URL
    content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                         default=jsonable_encoder).encode("utf-8")
    headers = {**wrapper.get_headers(), "content-type": "application/json"}
    resp = wrapper.httpx_client.httpx_client.post(
        f"{wrapper.get_base_url().rstrip('/')}/{path.lstrip('/')}", content=content,
        params=params, headers=headers,
        timeout=httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s,
    )
    try:
        answer = resp.json()
    except ValueError:
        answer = resp.text
    if not 200 <= resp.status_code < 300:
        raise ApiError(status_code=resp.status_code, headers=dict(resp.headers), body=answer)
    return answer


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


def find_project(client: LabelStudio, project: str | int, *, counters: bool = True) -> Any | None:
    """A project by numeric id or exact title; None when there is none.

    A title shared by several projects is an error (never guess which one is meant).
    ``counters=False``: a project found by title comes with its id, title, creation time (the
    ingest ledger's epoch), task number and labeling config only, without the annotation
    counters (Label Studio counts them over every task: 0.3 s of a 50,000-task project,
    against 0.1 s).
    """
    light = "id,title,created_at,task_number,label_config"
    if isinstance(project, int) or str(project).isdigit():
        try:
            return client.projects.get(id=int(project))
        except ApiError as err:
            if err.status_code == 404:
                return None
            raise
    listed = client.projects.list(title=str(project), include=None if counters else light)
    matches = [p for p in listed if p.title == str(project)]
    if len(matches) > 1:
        ids = ", ".join(str(p.id) for p in matches)
        raise ConfigError(f"several Label Studio projects are titled {project!r} (ids {ids}); pass an id")
    return matches[0] if matches else None


def require_project(client: LabelStudio, project: str | int, *, counters: bool = True) -> Any:
    """Like ``find_project`` but a missing project is a clear error naming it."""
    found = find_project(client, project, counters=counters)
    if found is None:
        raise ConfigError(f"Label Studio project {project!r} does not exist")
    return found


#: The project counters a build reconciles its change list against and records with a version.
PROJECT_COUNTERS = ("task_number", "num_tasks_with_annotations", "total_annotations_number",
                    "finished_task_number", "skipped_annotations_number")


def project_counters(client: LabelStudio, project_id: int) -> dict[str, int]:
    """The project's ``PROJECT_COUNTERS``, and nothing else (``GET /api/projects/counts/``:
    Label Studio computes only the counters asked for, about 0.2 s of a 55,000-task project
    against 0.4 s for the project itself). A missing project is a ConfigError."""
    page = client.projects.list_counts(ids=str(int(project_id)),
                                       include=",".join(("id", *PROJECT_COUNTERS)))
    found = [p for p in page.results or [] if int(p.id or 0) == int(project_id)]
    if not found:
        raise ConfigError(f"Label Studio project {project_id} does not exist (deleted?)")
    return {k: int(getattr(found[0], k, 0) or 0) for k in PROJECT_COUNTERS}
