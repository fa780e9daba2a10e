"""RFC 9457 problem details: every error the API returns is application/problem+json."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from triage.errors import IngestError
from triage.reliability.retry import is_database_outage

PROBLEM_JSON = "application/problem+json"
# Zendesk retries a webhook answered 503 only when Retry-After is under a minute (a 500 it
# never retries), and a database restart is over within seconds.
OUTAGE_RETRY_AFTER_SECONDS = 10

log = logging.getLogger(__name__)


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def install(app: FastAPI) -> None:
    @app.exception_handler(IngestError)
    async def _ingest(_: Request, exc: IngestError) -> JSONResponse:
        response = problem(exc.status, exc.title, exc.message, **exc.extra)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, _title(exc.status_code), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "problem": e["msg"]} for e in exc.errors()
        ]
        return problem(422, "Invalid request", "request parameters are invalid", errors=errors)

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        if not is_database_outage(exc):
            raise exc  # a bug, not an outage: the 500 below, with its traceback logged
        log.warning("%s %s: database unavailable: %r", request.method, _loggable_path(request), exc)
        response = problem(
            503,
            "Service unavailable",
            "the database is unavailable; the request was not completed, send it again",
        )
        response.headers["Retry-After"] = str(OUTAGE_RETRY_AFTER_SECONDS)
        return response

    # Starlette answers anything else with a text/plain 500 (and logs the traceback either
    # way); the body names no internals.
    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return problem(500, "Internal Server Error", "an unexpected error; see the service's log")


def _loggable_path(request: Request) -> str:
    """The request's path without the secret a URL-authenticated source carries in it
    (`/webhooks/django-helpdesk/<token>`): logs are read more widely than the secret is."""
    path = request.url.path
    token = request.path_params.get("token")
    return path.replace(token, "<token>") if token else path


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
