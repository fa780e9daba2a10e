"""The common inbound ticket every source parses into, and the generic webhook payload."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

# A helpdesk's ticket id as its payload carries it, bounded to what `tickets.external_id`
# (255 characters) holds: PostgreSQL refuses a longer value at INSERT, after validation,
# and JSON integers have no size limit.
EXTERNAL_ID_LENGTH = 255


def _storable_id(value: int | str) -> int | str:
    if not 1 <= len(str(value)) <= EXTERNAL_ID_LENGTH:
        raise ValueError(f"must be 1 to {EXTERNAL_ID_LENGTH} characters long")
    return value


def _integer_or_string(value: Any) -> Any:
    # Pydantic would read JSON true, false and 1.0 as the integers 1, 0 and 1: another
    # ticket's id, whose text this one would then update or be taken for a redelivery of.
    if isinstance(value, bool | float):
        raise ValueError("must be an integer or a string")
    return value


IntId = Annotated[int, BeforeValidator(_integer_or_string), AfterValidator(_storable_id)]
ExternalId = Annotated[int | str, BeforeValidator(_integer_or_string), AfterValidator(_storable_id)]


def in_utc(value: datetime) -> datetime:
    """`value` as an aware UTC datetime, the only kind triage stores. Helpdesks that omit the
    offset mean UTC. Converted here, while parsing: at the INSERT a time UTC cannot express
    (year 1 with an offset east of UTC, 9999 with one west) was an OverflowError, a 500."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is outside the years 1 to 9999 once converted to UTC") from None


def _unparsable_as_none(value: Any, handler: ValidatorFunctionWrapHandler) -> datetime | None:
    try:
        parsed = handler(value)
    except ValidationError:
        return None
    return parsed if isinstance(parsed, datetime) else None


# A time in a webhook: aware and in UTC.
UTCTime = Annotated[datetime, AfterValidator(in_utc)]
# A helpdesk's time field, filled from whatever placeholder the admin chose: a value that is
# not a time UTC can hold (a display format, an empty string) is no time, not a reason to
# refuse the ticket.
LenientUTCTime = Annotated[UTCTime | None, WrapValidator(_unparsable_as_none)]


class Requester(BaseModel):
    model_config = ConfigDict(extra="ignore")

    email: str | None = Field(None, max_length=320)
    name: str | None = Field(None, max_length=255)


class GenericTicketPayload(BaseModel):
    """The `generic` source's body (DESIGN.md)."""

    model_config = ConfigDict(extra="forbid")

    external_id: str = Field(min_length=1, max_length=255)
    subject: str = Field("", max_length=1000)
    body: str = Field(min_length=1)
    requester: Requester = Requester()
    channel: str | None = Field(None, max_length=32)
    created_at: UTCTime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class InboundTicket(BaseModel):
    """A ticket as triage stores it, whatever helpdesk it came from."""

    model_config = ConfigDict(frozen=True)

    source: str
    external_id: str
    subject: str
    body: str
    requester_email: str | None = None
    requester_name: str | None = None
    channel: str | None = None
    created_at: datetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    # Set when the helpdesk reports new customer text on a ticket it already sent (a comment,
    # a follow-up): `update_key` names that update so a redelivery of it is recognised,
    # `update_text` is the new text. Both None for a new ticket.
    update_key: str | None = None
    update_text: str | None = None


class Ignored(BaseModel):
    """A delivery that is authentic but not a ticket for triage (e.g. triage's own note)."""

    model_config = ConfigDict(frozen=True)

    reason: str


# The marker triage puts at the start of every note it writes into a helpdesk, so that the
# helpdesk's own webhook for that note can be recognised and dropped (no loops).
TRIAGE_NOTE_MARKER = "[triage]"
