"""Zendesk: webhooks signed as Zendesk documents, with the ticket a trigger's JSON body carries.

Signature: `X-Zendesk-Webhook-Signature` is base64(HMAC-SHA256(signing secret,
timestamp + body)), where timestamp is the `X-Zendesk-Webhook-Signature-Timestamp` header as
sent (ISO 8601, e.g. `2026-11-26T06:00:00Z`). The secret is the webhook's signing secret, used
as its UTF-8 bytes (TRIAGE_WEBHOOK_SECRET_ZENDESK).

Body: Zendesk lets a trigger post any JSON built from placeholders, so triage defines the
shape it expects (see README for a ready-made trigger body):

    {"ticket": {"id": 123, "subject": "...", "description": "...", "priority": "high",
                "tags": ["a", "b"] or "a b", "group_id": 7, "group": "Support",
                "via": "email" or {"channel": "email"}, "channel": "email",
                "requester": {"email": "...", "name": "..."},
                "created_at": "...", "updated_at": "..."},
     "event": "created" | "updated",            # optional, default "created"
     "comment": {"id": 99, "body": "...", "public": true}}   # optional, with "updated"

An "updated" event with a public comment is new customer text for the update policy. Private
comments (agents' notes, triage's own) and anything starting with the triage marker are
ignored: triage's write-back fires the same "ticket updated" trigger and must not loop.
"""

from __future__ import annotations

import base64
import hmac
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from triage.config import Settings
from triage.ingest.models import (
    TRIAGE_NOTE_MARKER,
    ExternalId,
    Ignored,
    InboundTicket,
    LenientUTCTime,
)
from triage.ingest.signing import unauthorized
from triage.ingest.sources.base import (
    load_json,
    secret_for,
    text_key,
    validate_payload,
)

SIGNATURE_HEADER = "x-zendesk-webhook-signature"
TIMESTAMP_HEADER = "x-zendesk-webhook-signature-timestamp"


def zendesk_signature(secret: str, timestamp: str, body: bytes) -> str:
    # The one-shot C digest, as `signing.sign` has it.
    digest = hmac.digest(secret.encode(), timestamp.encode() + body, "sha256")
    return base64.b64encode(digest).decode()


class ZendeskRequester(BaseModel):
    model_config = ConfigDict(extra="ignore")

    email: str | None = Field(None, max_length=320)
    name: str | None = Field(None, max_length=255)


class ZendeskTicket(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: ExternalId
    subject: str = Field("", max_length=1000)
    # {{ticket.description}}: Zendesk renders a placeholder with no value as blank (a first
    # comment that is only an attachment). Required all the same: a trigger body without it
    # is misconfigured.
    description: str
    priority: str | None = None
    tags: list[str] = Field(default_factory=list)
    group_id: int | str | None = None
    group: str | None = None
    via: str | dict[str, Any] | None = None
    channel: str | None = None
    requester: ZendeskRequester = ZendeskRequester()
    # {{ticket.created_at_with_time}} renders for display ("November 26, 2026 06:00"); only
    # {{ticket.created_at_with_timestamp}} is ISO 8601.
    created_at: LenientUTCTime = None
    updated_at: LenientUTCTime = None

    @field_validator("tags", mode="before")
    @classmethod
    def _split_tags(cls, value: Any) -> Any:
        # The {{ticket.tags}} placeholder renders as one space-separated string.
        if isinstance(value, str):
            return value.split()
        return [] if value is None else value

    def channel_name(self) -> str | None:
        if self.channel:
            return self.channel[:32]
        if isinstance(self.via, dict):
            channel = self.via.get("channel")
            return str(channel)[:32] if channel is not None else None
        return self.via[:32] if self.via else None


class ZendeskComment(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: int | str | None = None
    body: str = ""
    public: bool = True


class ZendeskPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ticket: ZendeskTicket
    event: Literal["created", "updated"] = "created"
    comment: ZendeskComment | None = None


class ZendeskSource:
    name = "zendesk"

    def verify(
        self, settings: Settings, headers: Mapping[str, str], body: bytes, path_token: str | None
    ) -> None:
        secret = secret_for(settings, self.name)
        signature = headers.get(SIGNATURE_HEADER)
        timestamp = headers.get(TIMESTAMP_HEADER)
        if not signature or not timestamp:
            raise unauthorized(f"missing {SIGNATURE_HEADER} or {TIMESTAMP_HEADER} header")
        try:
            sent_at = datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise unauthorized(f"{TIMESTAMP_HEADER} is not an ISO 8601 time") from None
        tolerance = settings.webhook_tolerance_seconds
        if abs(time.time() - sent_at) > tolerance:
            raise unauthorized(f"{TIMESTAMP_HEADER} is outside the {tolerance}s tolerance")
        expected = zendesk_signature(secret, timestamp, body)
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            raise unauthorized(f"{SIGNATURE_HEADER} does not match the body")

    def parse(self, body: bytes) -> InboundTicket | Ignored:
        payload = validate_payload(ZendeskPayload, load_json(body))
        ticket = payload.ticket
        update_key = update_text = None
        if payload.event == "updated" and payload.comment is not None:
            comment = payload.comment
            if not comment.public or comment.body.lstrip().startswith(TRIAGE_NOTE_MARKER):
                return Ignored(reason="private or triage-written comment")
            # A blank id (a placeholder with no value renders as "") names no comment: keyed
            # by it, every comment of the ticket would be taken for a redelivery of the first.
            comment_id = comment.id if comment.id not in (None, "") else text_key(comment.body)
            update_key = f"comment:{comment_id}"
            update_text = comment.body
        return InboundTicket(
            source=self.name,
            external_id=str(ticket.id),
            subject=ticket.subject,
            body=ticket.description,
            requester_email=ticket.requester.email,
            requester_name=ticket.requester.name,
            channel=ticket.channel_name(),
            created_at=ticket.created_at,
            metadata={
                "priority": ticket.priority,
                "tags": ticket.tags,
                "group_id": ticket.group_id,
                "group": ticket.group,
            },
            update_key=update_key,
            update_text=update_text,
        )
