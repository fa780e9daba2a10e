"""Standard Webhooks verification, checked against the reference `standardwebhooks` library."""

from __future__ import annotations

import base64
import time

import pytest
from standardwebhooks import Webhook

from triage.errors import IngestError
from triage.ingest.signing import sign, verify

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
BODY = b'{"external_id":"1","body":"hi"}'


def reference_headers(body: bytes, ts: int, msg_id: str = "msg_1") -> dict[str, str]:
    from datetime import UTC, datetime

    signature = Webhook(SECRET).sign(msg_id, datetime.fromtimestamp(ts, tz=UTC), body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": signature}


def test_our_signature_equals_the_reference_librarys():
    ts = 1_700_000_000
    assert sign(SECRET, "msg_1", ts, BODY) == reference_headers(BODY, ts)["webhook-signature"]


def test_reference_signed_request_verifies():
    now = int(time.time())
    assert verify(SECRET, reference_headers(BODY, now), BODY) == "msg_1"


def test_one_matching_signature_among_several_is_enough():
    now = int(time.time())
    headers = reference_headers(BODY, now)
    headers["webhook-signature"] = "v1,AAAA " + headers["webhook-signature"]
    verify(SECRET, headers, BODY)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h, b: (h, b + b" "),  # body changed after signing
        lambda h, b: ({**h, "webhook-id": "msg_2"}, b),
        lambda h, b: ({**h, "webhook-signature": "v1,bm9wZQ=="}, b),
        lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b),
        lambda h, b: ({**h, "webhook-timestamp": "soon"}, b),
    ],
)
def test_tampered_or_incomplete_requests_are_401(mutate):
    headers, body = mutate(reference_headers(BODY, int(time.time())), BODY)
    with pytest.raises(IngestError) as info:
        verify(SECRET, headers, body)
    assert info.value.status == 401


def test_stale_and_future_timestamps_are_refused():
    for offset in (-301, 301):
        ts = int(time.time()) + offset
        with pytest.raises(IngestError, match="tolerance"):
            verify(SECRET, reference_headers(BODY, ts), BODY, tolerance=300)


@pytest.mark.parametrize("ts_text", ["1" + "0" * 400, "-" + "9" * 400, str(2**1024)])
def test_a_timestamp_too_large_for_a_float_is_401_not_an_overflow(ts_text):
    headers = {**reference_headers(BODY, int(time.time())), "webhook-timestamp": ts_text}
    with pytest.raises(IngestError, match="tolerance") as info:
        verify(SECRET, headers, BODY)
    assert info.value.status == 401
