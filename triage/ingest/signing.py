"""Standard Webhooks (standardwebhooks.com) signatures: HMAC-SHA256 over
"{webhook-id}.{webhook-timestamp}.{body}", base64, sent as space-separated "v1,<sig>" entries.
"""

from __future__ import annotations

import base64
import hmac
import time
from collections.abc import Mapping
from functools import lru_cache

from triage.errors import IngestError

_PREFIX = "whsec_"


@lru_cache(maxsize=64)
def _key(secret: str) -> bytes:
    # Cached: every webhook of a source is checked with the same few secrets.
    raw = secret[len(_PREFIX) :] if secret.startswith(_PREFIX) else secret
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:
        # Secrets that are not base64 are used as raw bytes, as the reference libraries do.
        return raw.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    # The one-shot C digest: hmac.new builds two hash objects in Python per webhook.
    digest = hmac.digest(_key(secret), signed, "sha256")
    return "v1," + base64.b64encode(digest).decode()


def unauthorized(detail: str) -> IngestError:
    return IngestError(detail, status=401, title="Invalid webhook signature")


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: int = 300,
    now: float | None = None,
) -> str:
    """Check the signature headers; return the webhook-id. Raises a 401 IngestError."""
    msg_id = headers.get("webhook-id")
    ts_text = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not msg_id or not ts_text or not signatures:
        raise unauthorized("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        timestamp = int(ts_text)
    except ValueError:
        raise unauthorized("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    # Compared, not subtracted: the header is unauthenticated, and a float minus an int of
    # hundreds of digits raised OverflowError (a 500) for anyone who sent one.
    if not current - tolerance <= timestamp <= current + tolerance:
        raise unauthorized(f"webhook-timestamp is outside the {tolerance}s tolerance")
    expected = sign(secret, msg_id, timestamp, body).split(",", 1)[1]
    for entry in signatures.split():
        version, _, value = entry.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected.encode()):
            return msg_id
    raise unauthorized("no webhook-signature matches the body")
