"""The plug-in point for helpdesks: verify a request, parse it into an InboundTicket."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from triage.config import Settings
from triage.errors import IngestError
from triage.ingest.models import Ignored, InboundTicket

M = TypeVar("M", bound=BaseModel)


class WebhookSource(Protocol):
    name: str

    def verify(
        self, settings: Settings, headers: Mapping[str, str], body: bytes, path_token: str | None
    ) -> None:
        """Raise IngestError(401) unless the request is authentic and fresh."""

    def parse(self, body: bytes) -> InboundTicket | Ignored:
        """Raise IngestError(400/422) for a body that is not a ticket of this source; return
        Ignored for an authentic delivery triage must not act on (its own notes)."""


def secret_for(settings: Settings, source: str) -> str:
    secret = settings.webhook_secret(source)
    if not secret:
        # Refuse rather than accept unsigned traffic because a secret was forgotten.
        raise IngestError(
            f"no webhook secret configured for source {source!r} "
            f"(set TRIAGE_WEBHOOK_SECRET_{source.upper().replace('-', '_')})",
            status=401,
            title="Webhook source not configured",
        )
    return secret


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison, so response timing does not reveal how much of a guess
    matched."""
    if not given:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def text_key(text: str) -> str:
    """A short stable name for an update that the helpdesk gives no id of its own."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _not_json(name: str) -> Any:
    # Python reads NaN and Infinity, which JSON (RFC 8259) does not have and a PostgreSQL
    # json column refuses: the INSERT failed after validation, a 500 on every retry.
    raise ValueError(f"{name} is not a JSON value")


def _finite(number: str) -> float:
    # A number beyond a double's range (1e400) reads as Infinity, refused the same way.
    value = float(number)
    if not math.isfinite(value):
        raise ValueError(f"number {number[:32]} is beyond the range of a double")
    return value


# One decoder for every body: json.loads with hooks builds a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite)

# Characters a parsed body can hold that the database cannot store: NUL (JSON's "\u0000";
# PostgreSQL text refuses it, so the INSERT failed on every retry of the helpdesk) and half
# of a UTF-16 surrogate pair (an escaped emoji cut in two; validation refused the ticket).
# Both arrive only as \u escapes, so a body without one is not walked.
_UNSTORABLE_ESCAPE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def _storable(text: str) -> str:
    return _UNSTORABLE.sub(REPLACEMENT, text)


def map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """`value` with `fn` applied to every string in it, dict keys and nested values too."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {map_strings(k, fn): map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [map_strings(v, fn) for v in value]
    return value


# No helpdesk nests its payload deeper than a few levels. Deeper metadata would reach the
# recursive steps after parsing (validation, the JSON column's encoder) and fail there as
# RecursionError, a 500, instead of here as a 400.
MAX_JSON_DEPTH = 32


def _nested_deeper_than(data: Any, limit: int) -> bool:
    todo: list[tuple[Any, int]] = [(data, 1)]
    while todo:
        value, depth = todo.pop()
        children = value.values() if isinstance(value, dict) else value
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    return True
                todo.append((child, depth + 1))
    return False


def _too_deep() -> IngestError:
    return IngestError(
        f"body is not valid JSON for a webhook: nested deeper than {MAX_JSON_DEPTH} levels",
        status=400,
        title="Malformed JSON",
    )


def _utf8_text(body: bytes) -> str:
    """The body as text. JSON between systems is UTF-8 (RFC 8259, section 8.1): json.loads
    would also read UTF-16 and UTF-32 bytes, whose \\u0000 escapes the check for unstorable
    escapes never saw, so the NUL reached PostgreSQL (a 500 on every retry)."""
    try:
        text = body.decode("utf-8-sig")  # a UTF-8 byte order mark was always accepted
    except UnicodeDecodeError as exc:
        raise _not_utf8(str(exc)) from None
    # UTF-16 and UTF-32 without a byte order mark decode as UTF-8 with NULs between the
    # characters; a raw NUL is in no UTF-8 JSON text.
    if "\x00" in text:
        raise _not_utf8("it holds NUL bytes (UTF-16 or UTF-32?)")
    return text


def _not_utf8(why: str) -> IngestError:
    return IngestError(
        f"body is not UTF-8 JSON (RFC 8259): {why}", status=400, title="Malformed JSON"
    )


def load_json(body: bytes) -> Any:
    """The parsed body, every string in it storable: NUL and lone surrogates become U+FFFD."""
    text = _utf8_text(body)
    try:
        data = _DECODER.decode(text)
    except (json.JSONDecodeError, ValueError) as exc:
        raise IngestError(
            f"body is not valid JSON: {exc}", status=400, title="Malformed JSON"
        ) from None
    except RecursionError:
        raise _too_deep() from None
    if isinstance(data, (dict, list)) and _nested_deeper_than(data, MAX_JSON_DEPTH):
        raise _too_deep()
    # Whole surrogate pairs were joined by the parser; only halves are left to mend.
    return map_strings(data, _storable) if _UNSTORABLE_ESCAPE.search(text) else data


def validate_payload(model: type[M], data: Any) -> M:
    """Validate a parsed body; a 422 lists every missing or invalid field."""
    if not isinstance(data, dict):
        raise IngestError("body must be a JSON object", status=422, title="Invalid ticket payload")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "problem": e["msg"]} for e in exc.errors()
        ]
        fields = ", ".join(e["field"] for e in errors)
        raise IngestError(
            f"invalid or missing fields: {fields}",
            status=422,
            title="Invalid ticket payload",
            errors=errors,
        ) from None
