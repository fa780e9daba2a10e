"""The Anthropic backend: Haiku (or any configured model) under a strict output schema.

One call per ticket in the normal case. The SDK's own retries are off: the pipeline's retry
policy is the only one (see triage/reliability/retry.py). An answer that fails validation gets
one repair call that shows the model its validation error; a second failure is permanent.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Literal

import anthropic
import httpx2
from pydantic import ValidationError

from triage.classify.backends.base import ClassificationRequest, ClassificationResult, Usage
from triage.classify.backends.deadline import CallDeadline
from triage.classify.backends.messages import (
    Answer,
    LabelRequest,
    answer_text,
    read_answer,
    usage_of,
)
from triage.classify.schema import TicketLabel, validate_label
from triage.config import ModelSpec
from triage.errors import (
    ApiKeyRejected,
    InvalidOutput,
    PermanentError,
    RateLimited,
    TransientError,
    TriageError,
)
from triage.reliability.retry import retry_after_seconds
from triage.taxonomy import Taxonomy
from triage.telemetry import tracer_installed


class AnthropicBackend:
    name = "anthropic"

    def __init__(
        self,
        *,
        taxonomy: Taxonomy,
        model: str,
        spec: ModelSpec,
        client: ThreadClients,
        max_tokens: int = 256,
    ) -> None:
        self.model = model
        self.models = frozenset({model})
        self._spec = spec
        self._client = client
        self._max_tokens = max_tokens
        self._taxonomy = taxonomy
        # Built once per taxonomy version; every call reuses the same objects.
        self._request = LabelRequest(
            taxonomy=taxonomy, model=model, spec=spec, max_tokens=max_tokens
        )
        self._prompt_version = self._request.prompt_version
        # SDK 2.13 has no `temperature` argument; models that still accept it get it this way.
        self._extra_body: dict[str, Any] | None = self._request.sampling or None

    def classify(self, request: ClassificationRequest) -> ClassificationResult:
        messages: list[Any] = list(self._request.messages(request))
        started = time.perf_counter()
        usage = Usage()
        calls = 0
        request_id: str | None = None
        label: TicketLabel | None = None
        for repair in (False, True):
            calls += 1
            message, call_id = self._call(messages, request.ticket_id, calls, usage)
            request_id = call_id or request_id
            usage = usage + usage_of(message, self._spec, self.model)
            try:
                text = answer_text(message, request.ticket_id, request_id)
            except TriageError as exc:
                # A refusal or a cut-off answer was still a paid call.
                raise _paid(exc, calls, usage) from None
            try:
                label = validate_label(self._taxonomy, text)
                break
            except ValidationError as exc:
                if repair:
                    # Which fields failed is triage's to log; how may quote the model's
                    # answer (a language "code" that is a sentence of the ticket).
                    raise _paid(
                        InvalidOutput(
                            "model output failed validation after a repair attempt "
                            f"({_fields(exc)})",
                            quoted=_errors(exc),
                            ticket_id=request.ticket_id,
                            request_id=request_id,
                        ),
                        calls,
                        usage,
                    ) from exc
                messages += [
                    {"role": "assistant", "content": text or "(empty)"},
                    {
                        "role": "user",
                        "content": "That answer does not match the schema: "
                        f"{_errors(exc)}. Answer again with only the corrected JSON object.",
                    },
                ]
        assert label is not None
        return ClassificationResult(
            label=label,
            backend=self.name,
            model=self.model,
            prompt_version=self._prompt_version,
            latency_ms=(time.perf_counter() - started) * 1000,
            usage=usage,
            request_id=request_id,
            calls=calls,
        )

    def _call(
        self, messages: list[Any], ticket_id: int, calls: int, paid: Usage
    ) -> tuple[Answer, str | None]:
        """One call; the answer and the API's request id. The raw response is read by
        `read_answer` instead of the SDK's `Message` parse (see `Answer`). A failure carries
        the calls made so far and what the answered ones cost (`paid`): a repair call that
        fails does not make the first answer free."""
        try:
            raw = self._client.get().messages.with_raw_response.create(
                model=self.model,
                max_tokens=self._max_tokens,
                system=self._request.system,
                messages=messages,
                output_config=self._request.output_config,
                extra_body=self._extra_body,
            )
            return read_answer(raw.read(), ticket_id, raw.request_id), raw.request_id
        except anthropic.APIError as exc:
            # A call the API failed is not billed, but it counts against the attempt's bound.
            raise _paid(translate_api_error(exc, ticket_id), calls, paid) from exc
        except TriageError as exc:
            raise _paid(exc, calls, paid) from exc


def translate_api_error(exc: anthropic.APIError, ticket_id: int | None = None) -> TriageError:
    """Name an SDK failure by what to do about it."""
    request_id = getattr(exc, "request_id", None)
    if isinstance(exc, anthropic.APITimeoutError):
        return TransientError(f"API timeout: {exc}", ticket_id=ticket_id)
    if isinstance(exc, anthropic.APIConnectionError):
        return TransientError(f"API connection failed: {exc}", ticket_id=ticket_id)
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        # The API's message may quote the request (and so the ticket): its status and error
        # type say what happened; the message is quoted, kept for the record only.
        where = {"quoted": exc.message, "ticket_id": ticket_id, "request_id": request_id}
        summary = f"API {status} {_error_type(exc.body)}".rstrip()
        if status in (429, 529) or (status == 503 and _retry_after(exc) is not None):
            return RateLimited(summary, retry_after=_retry_after(exc), **where)
        if status == 408 or status == 409 or status >= 500:
            return TransientError(summary, **where)  # type: ignore[arg-type]
        if status == 401:
            return ApiKeyRejected(summary, **where)  # type: ignore[arg-type]
        # 403 (permission_error) and 404 stay permanent: a key that works but may not use one
        # model (perhaps only the escalation model, which the cascade then sends to review) or
        # a model name that does not exist is a configuration fault a retry cannot mend, and
        # pausing the fleet would also stop the tickets the other model can label.
        return PermanentError(summary, **where)  # type: ignore[arg-type]
    return PermanentError(
        f"API error: {exc.__class__.__name__}",
        quoted=str(exc),
        ticket_id=ticket_id,
        request_id=request_id,
    )


def _error_type(body: object) -> str:
    """The `error.type` of an API error body (`overloaded_error`), or ""."""
    error = body.get("error") if isinstance(body, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    return kind if isinstance(kind, str) else ""


def _retry_after(exc: anthropic.APIStatusError) -> float | None:
    return retry_after_seconds(exc.response.headers)


def _fields(exc: ValidationError) -> str:
    return ", ".join(".".join(str(p) for p in err["loc"]) or "(root)" for err in exc.errors()[:5])


def _errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def _paid(error: TriageError, calls: int, usage: Usage) -> TriageError:
    error.api_calls = calls
    error.usage = usage
    return error


class ThreadClients:
    """One SDK client per calling thread, all sharing one TLS context.

    The SDK's HTTP connection pool does its bookkeeping under one lock, looking through every
    connection and waiting request; a worker's 64 call threads on one client all go through
    it. Against the fake Messages API, 64 threads in one process, CPU per call: one shared
    client 1.5-1.6 ms, a client per thread 1.35-1.37 ms. In `make bench` (three alternating
    runs each): CPU-bound 259-263 tickets/s against 241-253, and a call at 0.5 s took 513-520
    ms in the worker against 528-543. A TLS context costs 17 ms to build, and 64 clients with
    one each added 54 MiB to a process; sharing one, a worker stays at 170 MiB.
    """

    def __init__(self, *, api_key: str, base_url: str | None, timeout: float) -> None:
        self._api_key = api_key
        self._base_url = base_url
        self._timeout = timeout
        self._tls = httpx2.create_ssl_context()
        self._local = threading.local()

    def get(self) -> anthropic.Anthropic:
        client: anthropic.Anthropic | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = make_client(
                api_key=self._api_key,
                base_url=self._base_url,
                timeout=self._timeout,
                http_client=anthropic.DefaultHttpxClient(
                    verify=self._tls,
                    timeout=self._timeout,
                    # The timeout bounds each read; the lease needs it to bound the call.
                    event_hooks=CallDeadline(self._timeout).hooks(),
                ),
            )
        return client


def make_client(
    *,
    api_key: str,
    base_url: str | None,
    timeout: float,
    http_client: httpx2.Client | None = None,
) -> anthropic.Anthropic:
    """One client. Alone, for callers with a single thread of calls (batches, `triage
    doctor`); the worker's calls get one per thread (`ThreadClients`)."""
    return anthropic.Anthropic(
        api_key=api_key,
        base_url=base_url,
        timeout=timeout,
        # One home for retries: the pipeline's policy (see module docstring).
        max_retries=0,
        http_client=http_client,
        open_telemetry=sdk_tracing(),
    )


def sdk_tracing() -> Literal[False] | None:
    """The SDK's OpenTelemetry spans only where something can record them.

    With no tracer provider set up, the SDK still builds every call's span attributes before
    it finds the span records nothing: one thread against the fake, a median 1,665 µs of CPU
    per call against 1,489 µs with spans off. None leaves the choice to the SDK (its
    `ANTHROPIC_OPEN_TELEMETRY*` variables, a provider the application or
    `opentelemetry-instrument` installed); False turns the spans off.
    """
    if os.environ.get("ANTHROPIC_OPEN_TELEMETRY") is not None or tracer_installed():
        return None
    return False
