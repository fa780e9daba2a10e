"""The generic source: DESIGN.md's JSON ticket, signed per Standard Webhooks."""

from __future__ import annotations

from collections.abc import Mapping

from triage.config import Settings
from triage.ingest import signing
from triage.ingest.models import GenericTicketPayload, InboundTicket
from triage.ingest.sources.base import load_json, secret_for, validate_payload


class GenericSource:
    name = "generic"

    def verify(
        self, settings: Settings, headers: Mapping[str, str], body: bytes, path_token: str | None
    ) -> None:
        signing.verify(
            secret_for(settings, self.name),
            headers,
            body,
            tolerance=settings.webhook_tolerance_seconds,
        )

    def parse(self, body: bytes) -> InboundTicket:
        payload = validate_payload(GenericTicketPayload, load_json(body))
        return InboundTicket(
            source=self.name,
            external_id=payload.external_id,
            subject=payload.subject,
            body=payload.body,
            requester_email=payload.requester.email,
            requester_name=payload.requester.name,
            channel=payload.channel,
            created_at=payload.created_at,
            metadata=payload.metadata,
        )
