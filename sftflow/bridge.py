"""The event bridge: a small ASGI app that turns webhooks into Prefect events.

Prefect server (OSS) has no incoming webhooks, so ``sftflow webhooks serve`` runs this app:

- ``POST /labelstudio[?min_new=N&dataset=D&count=tasks|annotations&k=1]``: Label Studio
  webhooks -> ``sftflow.annotation.created``;
- ``POST /s3``: S3 / MinIO event notifications -> ``sftflow.prompts.arrived``;
- ``GET /health``: ``{"status": "UP", "counts": {...}}`` (what was accepted, emitted, refused).

Every POST must carry the shared secret in ``X-Sftflow-Secret`` (constant-time compare, else
401), a body of at most ``settings.webhooks.max_body_bytes`` (else 413) that is a JSON object
(else 400: not JSON, nested too deeply, a number too long, not an object) of the expected shape
and types (else 422). Every answer to a bad body names what is wrong; refused requests emit
nothing. Unknown actions get 200 and are counted as ignored. If Prefect cannot take the event
the answer is 503 (Label Studio does not retry; the scheduled check-annotations deployment
reconciles).

A webhook whose counters claim a threshold crossing is verified first: one
``GET /api/projects/<id>`` (``counters.fetch_counters``, ``verify_timeout_s``, no retries), and
the event is computed from Label Studio's counters, so a forged or stale claim emits the plain
``below`` event. If Label Studio does not answer in time (or fails), nothing is emitted (the
answer lists it as ignored, ``unverified`` in the counts): the scheduled check covers it.
Webhooks that claim no crossing cost no Label Studio call.
"""

from __future__ import annotations

import asyncio
import logging
import time
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

from sftflow.core.errors import ConfigError, SftflowError
from sftflow.core.settings import Settings, resolve_secret
from sftflow.tasks.triggers.counters import ProjectCounters
from sftflow.tasks.triggers.webhooks import (
    SECRET_HEADER,
    BadRequest,
    EventSpec,
    Parsed,
    ThresholdQuery,
    claims_crossing,
    labelstudio_event,
    labelstudio_project,
    parse_json,
    s3_events,
    secret_ok,
)

logger = logging.getLogger("sftflow.bridge")

Emitter = Callable[[list[EventSpec]], Awaitable[None]]
BaselineLoader = Callable[[str | None], tuple[str | None, dict[str, Any] | None]]
CountersReader = Callable[[int], ProjectCounters]

#: How long a threshold crossing's check against Label Studio may take (its webhooks time out
#: after 1 s): past it, no crossing is emitted and the scheduled check covers it.
VERIFY_TIMEOUT_S = 0.5


class _TooLarge(Exception):
    pass


class _Unavailable(Exception):
    """A service the answer needs (S3 for the baseline) failed: 503, nothing emitted."""


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
    s3 = clients.s3  # built now, not on the first webhook (Label Studio waits 1 s for an answer)

    def load(dataset: str | None) -> tuple[str | None, dict[str, Any] | None]:
        return load_baseline(s3, dataset, prefix=settings.datasets.prefix)

    return load


def _labelstudio_reader(settings: Settings, timeout_s: float) -> CountersReader:
    """The project's counters from Label Studio: one GET, a short timeout, no retries; the
    client is built now, with the app, so the first webhook does not pay for it."""
    from sftflow.tasks.adapters.labelstudio import build_labelstudio
    from sftflow.tasks.triggers.counters import fetch_counters

    client = build_labelstudio(settings.labelstudio)

    def read(project_id: int) -> ProjectCounters:
        return fetch_counters(client, project_id, timeout_s=timeout_s)

    return read


async def _verify(reading: asyncio.Future, project_id: int,
                  timeout_s: float) -> ProjectCounters | str:
    """Label Studio's counters of the project (``reading``, already started), or why they could
    not be had in time. A project Label Studio does not have is a bad request (422)."""
    try:
        return await asyncio.wait_for(reading, max(0.0, timeout_s))
    except ConfigError as err:  # 404: no such project
        raise BadRequest(f"project {project_id}: {err}", status=422) from None
    except TimeoutError:
        return f"Label Studio did not answer within {timeout_s} s"
    except Exception as err:  # noqa: BLE001 - unreachable, 5xx, refused token: not verified
        return f"{type(err).__name__}: {str(err)[:200]}"


async def _baseline_and_check(
    body: Any, query: ThresholdQuery,
    baseline_of: Callable[[ThresholdQuery], Awaitable[tuple[str | None, dict[str, Any] | None]]],
    read: CountersReader, timeout_s: float,
) -> tuple[str | None, dict[str, Any] | None, int | None, ProjectCounters | str | None]:
    """(baseline version, baseline, the project whose crossing the body claims, its counters as
    Label Studio answered them or why not). The counter read starts with the baseline's, not
    after it: both fit in ``timeout_s``, well inside Label Studio's 1 s wait for the answer.
    When the baseline then shows no crossing, the read's answer goes unused."""
    deadline = time.monotonic() + timeout_s
    reading = None
    # A crossing needs the body's own count to reach min_new (the baseline only lowers it):
    # below that no Label Studio call is made at all.
    hopeful = claims_crossing(body, query, None)
    if hopeful is not None:
        reading = asyncio.ensure_future(run_in_threadpool(read, hopeful))
    try:
        version, baseline = await baseline_of(query)
        claimed = claims_crossing(body, query, baseline)
        verified = None
        if claimed is not None:
            if reading is None:  # only a baseline below zero gets here: read now, never trust
                reading = asyncio.ensure_future(run_in_threadpool(read, claimed))
            verified = await _verify(reading, claimed, deadline - time.monotonic())
        return version, baseline, claimed, verified
    finally:
        if reading is not None and not reading.done():
            reading.cancel()
        elif reading is not None and not reading.cancelled():
            reading.exception()  # retrieved: an unneeded read's error is not logged


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
        return JSONResponse({"error": str(err)}, status_code=err.status)
    except _Unavailable as err:
        return JSONResponse({"error": str(err)}, status_code=503)
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
    counters_reader: CountersReader | None = None,
    verify_timeout_s: float = VERIFY_TIMEOUT_S,
) -> Starlette:
    """The bridge app. ``emitter`` / ``baseline_loader`` / ``counters_reader`` default to
    Prefect, S3 and Label Studio (``settings.labelstudio``)."""
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
    read_counters = counters_reader or _labelstudio_reader(settings, verify_timeout_s)
    handle = partial(_handle, secret=secret, limit=limit, counts=counts, emitter=emitter)

    async def baseline_of(query: ThresholdQuery) -> tuple[str | None, dict[str, Any] | None]:
        if query.min_new is None or not query.dataset:
            return None, None
        try:
            return await run_in_threadpool(load_baseline, query.dataset)
        except SftflowError as err:  # e.g. an invalid dataset name in the URL
            raise BadRequest(f"dataset {query.dataset[:130]!r}: {err}", status=422) from None
        except Exception as err:  # noqa: BLE001 - S3 down: tell the sender, emit nothing
            logger.error("could not read the baseline of %s: %s", query.dataset, err)
            raise _Unavailable("could not read the dataset's baseline") from None

    async def labelstudio(request: Request) -> JSONResponse:
        async def parse(raw: bytes, body: Any) -> Parsed:
            query = ThresholdQuery.from_query(dict(request.query_params))
            labelstudio_project(body)  # the body's shape and types, checked before any I/O
            version, baseline, claimed, verified = await _baseline_and_check(
                body, query, baseline_of, read_counters, verify_timeout_s)
            if claimed is not None and isinstance(verified, str):
                counts["unverified"] += 1
                why = (f"threshold crossing of project {claimed} not verified ({verified}): "
                       "left to the scheduled check")
                return Parsed(ignored=[why])
            return labelstudio_event(body, raw, query, version, baseline, verified=verified)

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
