"""Freshdesk: automation-rule webhooks, authenticated with a shared secret.

Freshdesk does not sign its webhooks. Its "Trigger webhook" action can add custom headers and
basic-auth credentials, so the secret (TRIAGE_WEBHOOK_SECRET_FRESHDESK) is sent either in a
header (TRIAGE_FRESHDESK_TOKEN_HEADER, default `X-Triage-Token`) or as the basic-auth
password (any user name). Freshdesk retries deliveries, so there is no timestamp to check:
replays are absorbed by the (source, ticket id) uniqueness instead.

Body: the "simple" content mode with the ticket fields ticked, which Freshdesk wraps as

    {"freshdesk_webhook": {"ticket_id": 42, "ticket_subject": "...",
      "ticket_description": "<div>HTML</div>", "ticket_priority": "High" or 3,
      "ticket_tags": "a, b" or ["a", "b"], "ticket_group_name": "...", "ticket_source": "Email",
      "ticket_group_id": 7,                      # optional (see sinks/freshdesk.py)
      "ticket_contact_email": "...", "ticket_requester_email": "...",
      "ticket_contact_name": "...", "ticket_created_at": "...",
      "ticket_latest_public_comment": "..."}}

A non-empty `ticket_latest_public_comment` (an "update" automation) is new customer text for
the update policy. Triage's own note is private, so it never appears there.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from triage.config import Settings
from triage.ingest.models import (
    TRIAGE_NOTE_MARKER,
    ExternalId,
    Ignored,
    InboundTicket,
    in_utc,
)
from triage.ingest.signing import unauthorized
from triage.ingest.sources.base import (
    load_json,
    same_secret,
    secret_for,
    text_key,
    validate_payload,
)


def basic_auth_password(authorization: str | None) -> str | None:
    if not authorization or not authorization.lower().startswith("basic "):
        return None
    # ValueError covers binascii.Error, UnicodeDecodeError and the ValueError b64decode
    # raises for a str with non-ASCII characters (that was a 500, before authentication).
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
    except ValueError:
        return None
    _user, sep, password = decoded.partition(":")
    return password if sep else None


class FreshdeskTicket(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ticket_id: ExternalId
    ticket_subject: str = Field("", max_length=1000)
    # Empty when the ticket has no text (an e-mail that is only an attachment). Required all
    # the same: a rule whose webhook leaves it out is misconfigured.
    ticket_description: str
    ticket_priority: int | str | None = None
    ticket_tags: list[str] = Field(default_factory=list)
    ticket_group_name: str | None = None
    # Lets the write-back tell whether an agent moved the ticket since: the ticket read it
    # compares with names the group by id only.
    ticket_group_id: int | str | None = None
    ticket_source: str | int | None = None
    ticket_status: str | int | None = None
    ticket_contact_email: str | None = Field(None, max_length=320)
    ticket_requester_email: str | None = Field(None, max_length=320)
    ticket_contact_name: str | None = Field(None, max_length=255)
    ticket_requester_name: str | None = Field(None, max_length=255)
    ticket_created_at: str | None = None
    ticket_latest_public_comment: str | None = None

    @field_validator("ticket_tags", mode="before")
    @classmethod
    def _split_tags(cls, value: Any) -> Any:
        # {{ticket.tags}} renders as one comma-separated string.
        if isinstance(value, str):
            return [tag.strip() for tag in value.split(",") if tag.strip()]
        return [] if value is None else value

    def created(self) -> datetime | None:
        # Placeholder dates come in the account's display format; only ISO 8601 is used, and
        # only a time UTC can hold.
        if not self.ticket_created_at:
            return None
        try:
            return in_utc(datetime.fromisoformat(self.ticket_created_at.replace("Z", "+00:00")))
        except ValueError:
            return None


class FreshdeskPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    freshdesk_webhook: FreshdeskTicket


class FreshdeskSource:
    name = "freshdesk"

    def verify(
        self, settings: Settings, headers: Mapping[str, str], body: bytes, path_token: str | None
    ) -> None:
        secret = secret_for(settings, self.name)
        token = headers.get(settings.freshdesk_token_header.lower())
        password = basic_auth_password(headers.get("authorization"))
        if not (same_secret(token, secret) or same_secret(password, secret)):
            raise unauthorized(
                f"missing or wrong {settings.freshdesk_token_header} header or basic-auth password"
            )

    def parse(self, body: bytes) -> InboundTicket | Ignored:
        ticket = validate_payload(FreshdeskPayload, load_json(body)).freshdesk_webhook
        comment = (ticket.ticket_latest_public_comment or "").strip()
        if comment.startswith(TRIAGE_NOTE_MARKER):
            return Ignored(reason="triage-written comment")
        source = ticket.ticket_source
        return InboundTicket(
            source=self.name,
            external_id=str(ticket.ticket_id),
            subject=ticket.ticket_subject,
            body=ticket.ticket_description,
            requester_email=ticket.ticket_requester_email or ticket.ticket_contact_email,
            requester_name=ticket.ticket_contact_name or ticket.ticket_requester_name,
            channel=str(source).lower()[:32] if source is not None else None,
            created_at=ticket.created(),
            metadata={
                "priority": ticket.ticket_priority,
                "tags": ticket.ticket_tags,
                "group": ticket.ticket_group_name,
                "group_id": ticket.ticket_group_id,
                "status": ticket.ticket_status,
            },
            update_key=f"comment:{text_key(comment)}" if comment else None,
            update_text=comment or None,
        )
