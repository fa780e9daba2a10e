"""Outbound webhook: the routed ticket and its labels, POSTed as JSON and signed per Standard
Webhooks. `webhook-id` is stable per dispatch, so a receiver can drop a retried delivery.

As the spec has it, `webhook-timestamp` is the attempt's time (a receiver refuses one too old,
against replays) and the body's `timestamp` the event's, ISO 8601: when triage routed the
ticket. A retry sends the same body, only the attempt's headers are new."""

from __future__ import annotations

import json
import time
from datetime import UTC
from typing import Any

from triage.ingest.signing import sign
from triage.sinks.base import Delivery
from triage.sinks.http import make_client, send


def webhook_body(delivery: Delivery) -> dict[str, Any]:
    routed_at = delivery.routed_at.astimezone(UTC)
    return {
        "type": "ticket.needs_review" if delivery.needs_review else "ticket.routed",
        "timestamp": routed_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "data": {
            "ticket_id": delivery.ticket_id,
            "dispatch_id": delivery.dispatch_id,
            "source": delivery.source,
            "external_id": delivery.external_id,
            "route": delivery.route,
            "department": delivery.department,
            "needs_review": delivery.needs_review,
            "review_reason": delivery.review_reason,
            "label": delivery.label,
            "metadata": delivery.metadata,
        },
    }


class WebhookSink:
    max_requests = 1

    def __init__(self, name: str, url: str, *, secret: str, timeout_seconds: float) -> None:
        self.name = f"webhook:{name}"
        self.url = url
        self.secret = secret
        self.client = make_client(timeout_seconds)

    def deliver(self, delivery: Delivery) -> None:
        msg_id = f"dispatch_{delivery.dispatch_id}"
        timestamp = int(time.time())
        body = json.dumps(webhook_body(delivery), default=str).encode()
        send(
            self.client,
            "POST",
            self.url,
            what=f"{self.name} for ticket {delivery.ticket_id}",
            deadline=delivery.deadline,
            content=body,
            headers={
                "content-type": "application/json",
                "webhook-id": msg_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(self.secret, msg_id, timestamp, body),
            },
        )
