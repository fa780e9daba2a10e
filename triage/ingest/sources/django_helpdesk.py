"""django-helpdesk 2.x: its new-ticket and follow-up webhooks, authenticated by a URL token.

django-helpdesk (helpdesk/webhooks.py) posts, with no signature and a 3 s timeout,

    new ticket:  {"ticket": <TicketSerializer>, "queue_slug": "billing"}
    follow-up:   {"ticket": <TicketSerializer>, "queue_slug": "billing", "followup_id": 17}

where TicketSerializer has id, queue (id), title, description, resolution, submitter_email,
assigned_to, status, on_hold, priority (1 critical .. 5 very low), due_date, merged_to,
followup_set (id, ticket, user, title, comment, public, new_status, date, ...) and any
`custom_<name>` fields. Its webhook URL settings take plain URLs, so the secret
(TRIAGE_WEBHOOK_SECRET_DJANGO_HELPDESK) travels in the path: `/webhooks/django-helpdesk/<secret>`
(or `?token=<secret>`).

A follow-up that triage wrote itself (its title or comment starts with the triage marker) or
any private follow-up (staff notes) is ignored; a public follow-up's comment is new customer
text for the update policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from triage.config import Settings
from triage.ingest.models import TRIAGE_NOTE_MARKER, Ignored, InboundTicket, IntId
from triage.ingest.signing import unauthorized
from triage.ingest.sources.base import load_json, same_secret, secret_for, validate_payload


class HelpdeskFollowUp(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: int
    title: str | None = None
    comment: str | None = None
    public: bool = False
    # `user` (the author) is not modelled: it is the user model's primary key, a UUID string
    # in projects whose user model has one, and triage does not need it.


class HelpdeskTicket(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: IntId
    queue: int | None = None
    # Empty for an e-mail whose subject was empty or only a stripped "Re: " (email.py).
    title: str = Field(max_length=1000)
    description: str | None
    submitter_email: str | None = Field(None, max_length=320)
    status: int | None = None
    priority: int | None = None
    followup_set: list[HelpdeskFollowUp] = Field(default_factory=list)


class HelpdeskPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ticket: HelpdeskTicket
    queue_slug: str | None = None
    followup_id: int | None = None

    def followup(self) -> HelpdeskFollowUp | None:
        return next((f for f in self.ticket.followup_set if f.id == self.followup_id), None)


def _written_by_triage(followup: HelpdeskFollowUp) -> bool:
    return any(
        (text or "").lstrip().startswith(TRIAGE_NOTE_MARKER)
        for text in (followup.title, followup.comment)
    )


class DjangoHelpdeskSource:
    name = "django-helpdesk"

    def verify(
        self, settings: Settings, headers: Mapping[str, str], body: bytes, path_token: str | None
    ) -> None:
        if not same_secret(path_token, secret_for(settings, self.name)):
            raise unauthorized("missing or wrong token in the webhook URL")

    def parse(self, body: bytes) -> InboundTicket | Ignored:
        payload = validate_payload(HelpdeskPayload, load_json(body))
        ticket = payload.ticket
        update_key = update_text = None
        if payload.followup_id is not None:
            followup = payload.followup()
            if followup is not None and _written_by_triage(followup):
                return Ignored(reason=f"follow-up {followup.id} was written by triage")
            if followup is not None and not followup.public:
                return Ignored(reason=f"follow-up {followup.id} is a private staff note")
            update_key = f"followup:{payload.followup_id}"
            update_text = (followup.comment or "").strip() or None if followup else None
        metadata: dict[str, Any] = {
            "priority": ticket.priority,
            "queue_id": ticket.queue,
            "queue_slug": payload.queue_slug,
            "status": ticket.status,
        }
        return InboundTicket(
            source=self.name,
            external_id=str(ticket.id),
            subject=ticket.title,
            body=ticket.description or "",
            requester_email=ticket.submitter_email,
            metadata=metadata,
            update_key=update_key,
            update_text=update_text,
        )
