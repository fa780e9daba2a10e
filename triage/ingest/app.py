"""The webhook API. A ticket enters at POST /webhooks/{source}: verified, parsed, committed
with its outbox message, answered 202, and only then published to the broker. While the
database is unreachable it is spooled through the broker instead (`spool.py`).

No model or outbound call happens inside a request: helpdesks wait on us synchronously.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.telemetry import TelemetryConfig
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import SecretStr
from sqlalchemy import text

from triage.db.intake import store_ticket
from triage.db.models import is_row_id, utcnow
from triage.db.repo import Accepted, ticket_view
from triage.errors import IngestError, loggable
from triage.gc_pauses import freeze_startup_objects
from triage.ingest import problems
from triage.ingest.models import Ignored, InboundTicket
from triage.ingest.multiprocess_metrics import process_metrics
from triage.ingest.sources.registry import SOURCES
from triage.ingest.spool import spool_ticket
from triage.metrics import INGEST_LATENCY, TICKETS_RECEIVED, WEBHOOKS
from triage.pipeline.gauges import PipelineGauges
from triage.pipeline.runtime import Runtime, get_runtime
from triage.reliability.retry import is_database_outage
from triage.reliability.sweeper import Periodic
from triage.telemetry import any_provider_installed

log = logging.getLogger(__name__)

T = TypeVar("T")


class StoreThreads:
    """The threads a webhook's database work runs on, as many as the database pool has
    connections (a thread beyond that would only wait for one).

    Starlette's `run_in_threadpool` (anyio) cost the event loop twice what the store itself
    took on the store's thread (py-spy, `make bench` scenario 2): a capacity limiter, a
    cancel scope and a library probe per call. A plain executor hands off with one queue put
    and one wake-up. Opened on first use, so an app run without its lifespan works too."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        pool = self._pool or self._open()
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def _open(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._size, thread_name_prefix="triage-store")
            return self._pool

    def close(self) -> None:
        """Wait for the stores under way; a later `run` opens the threads again."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


async def read_body_limited(request: Request, limit: int) -> bytes:
    """Read at most `limit` bytes; refuse larger bodies without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise IngestError(
            f"body of {declared} bytes exceeds the {limit}-byte limit",
            status=413,
            title="Payload too large",
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise IngestError(
                f"body exceeds the {limit}-byte limit", status=413, title="Payload too large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _require_read_token(token: SecretStr | None, request: Request) -> None:
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise IngestError(
            "a bearer token is required (TRIAGE_API_READ_TOKEN)",
            status=401,
            title="Unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _require_json(request: Request) -> None:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise IngestError(
            f"content-type must be application/json, got {ctype or 'none'}",
            status=415,
            title="Unsupported media type",
        )


def log_to_stderr() -> None:
    """The API's log lines, INFO and above, on stderr: for `triage serve` and for each process
    `--workers N` starts (uvicorn sets up only its own loggers there)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def create_app(
    rt: Runtime | None = None, *, relay_interval: float = 2.0, freeze_gc: bool = False
) -> FastAPI:
    """The webhook API. `freeze_gc`: once started, freeze the objects the process holds
    (`triage.gc_pauses`). For a process that is this API (`triage serve`, the ASGI entry point);
    an application that mounts it in its own process decides that for itself."""
    runtime = rt or get_runtime()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop = Periodic("triage-relay", relay_interval, runtime.publisher.relay_pending)
        loop.start()
        # Webhooks arriving close together share classify messages: their tickets then share
        # the worker's claim too. (A worker's deliveries come in bursts per batch already.)
        runtime.start_batching(gather_stream=True)
        if freeze_gc:
            freeze_startup_objects("api")
        try:
            yield
        finally:
            stores.close()
            runtime.stop_batching()
            loop.stop()

    app = FastAPI(title="triage", version="0.1.0", lifespan=lifespan, telemetry=web_telemetry())
    problems.install(app)
    settings = runtime.settings
    stores = StoreThreads(settings.db_pool_size)

    def _store(inbound: InboundTicket, arrived_at: datetime) -> Accepted | None:
        """Store the ticket; None when the database is unreachable and the ticket went to the
        spool instead. With the broker unreachable too, the database's error stands (a 503)."""
        try:
            return store_ticket(
                runtime.sessions,
                inbound,
                update_policy=settings.update_policy,
                publisher=runtime.publisher,
            )
        except Exception as exc:
            if not is_database_outage(exc):
                raise
            try:
                spool_ticket(runtime.celery, inbound, arrived_at)
            except Exception as publish_error:  # noqa: BLE001 - any: the 503 below stands
                log.warning(
                    "webhook %s: database unavailable (%s), broker too (%s); answered 503",
                    inbound.source,
                    loggable(exc),
                    loggable(publish_error),
                )
                raise exc from None
            log.warning(
                "webhook %s: database unavailable (%s); ticket spooled on the broker until it "
                "is back",
                inbound.source,
                loggable(exc),
            )
            return None

    # The webhook routes are Starlette's own routes: they read the raw body and answer with
    # a response they build, so FastAPI's parameter solving and response handling had nothing
    # to do, and cost the API a seventh of its CPU per webhook (py-spy, `make bench`).
    async def receive_webhook(request: Request) -> Response:
        source = request.path_params["source"]
        return await _receive(source, request, request.query_params.get("token"))

    # For helpdesks that can only be given a URL (django-helpdesk): the secret is the rest of
    # the path, "/" included, as a base64 secret often has one. It shows in access logs like
    # any URL; keep those private.
    async def receive_webhook_with_token(request: Request) -> Response:
        source, token = request.path_params["source"], request.path_params["token"]
        # "/webhooks/django-helpdesk/?token=..." (a URL written the Django way) has an empty
        # path token: the query's counts.
        return await _receive(source, request, token or request.query_params.get("token"))

    app.router.add_route(
        "/webhooks/{source}", receive_webhook, methods=["POST"], include_in_schema=False
    )
    app.router.add_route(
        "/webhooks/{source}/{token:path}",
        receive_webhook_with_token,
        methods=["POST"],
        include_in_schema=False,
    )

    async def _receive(source: str, request: Request, token: str | None) -> JSONResponse:
        started = time.perf_counter()
        arrived_at = utcnow()
        status = 500
        try:
            handler = SOURCES.get(source)
            if handler is None:
                raise IngestError(
                    f"unknown source {source!r}; known: {', '.join(sorted(SOURCES))}",
                    status=404,
                    title="Unknown source",
                )
            _require_json(request)
            body = await read_body_limited(request, settings.max_body_bytes)
            handler.verify(settings, request.headers, body, token)
            inbound = handler.parse(body)
            if isinstance(inbound, Ignored):
                status = 202
                TICKETS_RECEIVED.labels(source=source, outcome="ignored").inc()
                return JSONResponse({"status": "ignored", "reason": inbound.reason}, 202)
            accepted = await stores.run(_store, inbound, arrived_at)
            if accepted is None:
                status = 202
                TICKETS_RECEIVED.labels(source=source, outcome="spooled").inc()
                return JSONResponse(
                    {"ticket_id": None, "status": "spooled", "duplicate": False}, 202
                )
            if accepted.outbox is not None:
                # Published off the request path: the helpdesk's wait does not include the
                # broker, and a burst of webhooks is published in batches.
                runtime.publish_after_commit([accepted.outbox])
            status = 202
            TICKETS_RECEIVED.labels(source=source, outcome=accepted.outcome).inc()
            return JSONResponse(
                {
                    "ticket_id": accepted.ticket_id,
                    "status": str(accepted.status),
                    "duplicate": accepted.duplicate,
                },
                status_code=202,
            )
        except IngestError as exc:
            status = exc.status
            raise
        except Exception as exc:
            # Answered 503 by problems.install: counted as what the helpdesk was told.
            if is_database_outage(exc):
                status = 503
            raise
        finally:
            WEBHOOKS.labels(source=source if source in SOURCES else "unknown", status=status).inc()
            INGEST_LATENCY.observe(time.perf_counter() - started)

    @app.get("/tickets/{ticket_id}")
    def get_ticket(ticket_id: int, request: Request) -> dict[str, Any]:
        _require_read_token(settings.api_read_token, request)
        view = None
        # Beyond bigint PostgreSQL refuses the query itself (a 500); no ticket has such an id.
        if is_row_id(ticket_id):
            with runtime.sessions() as session:
                view = ticket_view(session, ticket_id)
        if view is None:
            raise IngestError(f"ticket {ticket_id} not found", status=404, title="Not found")
        return view

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        checks = {"database": _check_db(runtime), "broker": _check_broker(runtime)}
        ok = all(v == "ok" for v in checks.values())
        if ok:
            return JSONResponse({"status": "ready", "checks": checks})
        return problems.problem(503, "Not ready", "a dependency is unavailable", checks=checks)

    # The deployment-wide gauges, read when scraped; a registry of this app's own, since the
    # process-wide one outlives an app (tests build many).
    gauges = CollectorRegistry()
    gauges.register(PipelineGauges(runtime))

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(process_metrics() + generate_latest(gauges), media_type=CONTENT_TYPE_LATEST)

    return app


# Each switched off only where nothing could record it (see triage/telemetry.py).
_TELEMETRY_OFF: TelemetryConfig = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
}


def web_telemetry() -> TelemetryConfig | None:
    """FastAPI's OpenTelemetry instrumentation only where something can record it.

    With no provider installed, FastAPI still asks OpenTelemetry for the providers on every
    request, and reads the environment doing so: 5-6% of the API process's CPU in GIL
    samples of `make bench`'s webhooks. None keeps FastAPI's defaults (a provider installed,
    or `FASTAPI_OTEL_AUTO_CONFIGURE` set, which installs exporters itself)."""
    if os.environ.get("FASTAPI_OTEL_AUTO_CONFIGURE", "").lower() == "true":
        return None
    return None if any_provider_installed() else _TELEMETRY_OFF


def _check_db(rt: Runtime) -> str:
    try:
        with rt.sessions() as session:
            session.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"error: {exc.__class__.__name__}"


def _check_broker(rt: Runtime) -> str:
    try:
        with rt.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"error: {exc.__class__.__name__}"
