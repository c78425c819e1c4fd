"""The event bridge: a small ASGI app that turns webhooks into Prefect events.

Prefect server (OSS) has no incoming webhooks, so ``sftflow webhooks serve`` runs this app:

- ``POST /labelstudio[?min_new=N&dataset=D&count=tasks|annotations&k=1]``: Label Studio
  webhooks -> ``sftflow.annotation.created``;
- ``POST /s3``: S3 / MinIO event notifications -> ``sftflow.prompts.arrived``;
- ``GET /health``: ``{"status": "UP", "counts": {...}}`` (what was accepted, emitted, refused).

Every POST must carry the shared secret in ``X-Sftflow-Secret`` (constant-time compare, else
401), a body of at most ``settings.webhooks.max_body_bytes`` (else 413) that is valid JSON of
the expected shape (else 400). Refused requests emit nothing. Unknown actions get 200 and are
counted as ignored. If Prefect cannot take the event the answer is 503 (Label Studio does not
retry; the scheduled check-annotations deployment reconciles).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sftflow.core.errors import ConfigError
from sftflow.core.settings import Settings, resolve_secret
from sftflow.tasks.triggers.webhooks import (
    SECRET_HEADER,
    BadRequest,
    EventSpec,
    Parsed,
    ThresholdQuery,
    labelstudio_event,
    parse_json,
    s3_events,
    secret_ok,
)

logger = logging.getLogger("sftflow.bridge")

Emitter = Callable[[list[EventSpec]], Awaitable[None]]
BaselineLoader = Callable[[str | None], tuple[str | None, dict[str, Any] | None]]


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _prefect_emitter() -> tuple[Emitter, Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """Emit through one long-lived Prefect events client (websocket to PREFECT_API_URL)."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    state: dict[str, Any] = {}
    lock = asyncio.Lock()

    async def start() -> None:
        state["client"] = get_events_client()
        await state["client"].__aenter__()

    async def stop() -> None:
        if "client" in state:
            await state.pop("client").__aexit__(None, None, None)

    async def emit(specs: list[EventSpec]) -> None:
        async with lock:
            for spec in specs:
                await state["client"].emit(
                    Event(event=spec.event, resource=spec.resource, payload=spec.payload, id=spec.id)
                )

    return emit, start, stop


def _s3_baseline_loader(settings: Settings) -> BaselineLoader:
    from sftflow.tasks.adapters.clients import Clients
    from sftflow.tasks.versions.read import load_baseline

    clients = Clients(settings)

    def load(dataset: str | None) -> tuple[str | None, dict[str, Any] | None]:
        return load_baseline(clients.s3, dataset, prefix=settings.datasets.prefix)

    return load


async def _handle(
    request: Request,
    parse: Callable[[bytes, Any], Awaitable[Parsed]],
    *,
    secret: str,
    limit: int,
    counts: Counter[str],
    emitter: Emitter,
) -> JSONResponse:
    """One webhook POST: check the secret and the body's size, parse it, emit its events."""
    counts["requests"] += 1
    if not secret_ok(request.headers.get(SECRET_HEADER), secret):
        counts["unauthorized"] += 1
        return JSONResponse({"error": f"missing or wrong {SECRET_HEADER}"}, status_code=401)
    try:
        raw = await _read_body(request, limit)
    except _TooLarge:
        counts["too_large"] += 1
        return JSONResponse({"error": f"body larger than {limit} bytes"}, status_code=413)
    try:
        parsed: Parsed = await parse(raw, parse_json(raw))
    except BadRequest as err:
        counts["bad_request"] += 1
        return JSONResponse({"error": str(err)}, status_code=400)
    counts["ignored"] += len(parsed.ignored)
    if parsed.events:
        try:
            await emitter(parsed.events)
        except Exception as err:  # noqa: BLE001 - tell the sender, keep serving
            counts["emit_failed"] += 1
            logger.error("could not emit %d event(s): %s", len(parsed.events), err)
            return JSONResponse({"error": "could not emit the event"}, status_code=503)
        counts["emitted"] += len(parsed.events)
    return JSONResponse({
        "emitted": [{"event": e.event, "id": str(e.id)} for e in parsed.events],
        "ignored": parsed.ignored,
    })


def _lifespan(start: Callable[[], Awaitable[None]] | None,
              stop: Callable[[], Awaitable[None]] | None) -> Callable[[Starlette], Any]:
    """Open the emitter's client when the app starts, close it when the app stops."""

    @asynccontextmanager
    async def lifespan(app: Starlette):
        if start is not None:
            await start()
        try:
            yield
        finally:
            if stop is not None:
                await stop()

    return lifespan


def create_app(
    settings: Settings,
    emitter: Emitter | None = None,
    baseline_loader: BaselineLoader | None = None,
) -> Starlette:
    """The bridge app. ``emitter`` / ``baseline_loader`` default to Prefect and S3."""
    secret = resolve_secret(settings.webhooks.secret, settings.webhooks.secret_block)
    if not secret:
        raise ConfigError(
            "webhook secret is not set (SFTFLOW_WEBHOOKS__SECRET or SFTFLOW_WEBHOOKS__SECRET_BLOCK)"
        )
    limit = settings.webhooks.max_body_bytes
    counts: Counter[str] = Counter()
    start = stop = None
    if emitter is None:
        emitter, start, stop = _prefect_emitter()
    load_baseline = baseline_loader or _s3_baseline_loader(settings)
    handle = partial(_handle, secret=secret, limit=limit, counts=counts, emitter=emitter)

    async def labelstudio(request: Request) -> JSONResponse:
        async def parse(raw: bytes, body: Any) -> Parsed:
            query = ThresholdQuery.from_query(dict(request.query_params))
            version, baseline = (None, None)
            if query.min_new is not None and query.dataset:
                version, baseline = await run_in_threadpool(load_baseline, query.dataset)
            return labelstudio_event(body, raw, query, version, baseline)

        return await handle(request, parse)

    async def s3(request: Request) -> JSONResponse:
        async def parse(raw: bytes, body: Any) -> Parsed:
            return s3_events(body)

        return await handle(request, parse)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "UP", "counts": dict(counts)})

    app = Starlette(
        routes=[
            Route("/labelstudio", labelstudio, methods=["POST"]),
            Route("/s3", s3, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=_lifespan(start, stop),
    )
    app.state.counts = counts
    return app
