"""Write-back to the helpdesk a ticket came from, and what triage writes there.

Each helpdesk writer is one module (zendesk.py, freshdesk.py, django_helpdesk.py); the
"helpdesk" sink picks the writer for the delivery's source. Tickets from a source without a
configured writer (e.g. `generic`) are left to the queue.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from triage.errors import PermanentError
from triage.ingest.models import TRIAGE_NOTE_MARKER
from triage.sinks.base import Delivery, Sink

log = logging.getLogger(__name__)


def ticket_number(delivery: Delivery) -> str:
    """The helpdesk's ticket id, checked before it goes into a URL path: Zendesk, Freshdesk and
    django-helpdesk number their tickets, and the sources accept any string as an id, so one
    like `1/../../users/me` would otherwise send the write-back, with its credentials, to
    another endpoint."""
    number = delivery.external_id
    if not (number.isascii() and number.isdigit()):
        # The id is whatever the webhook sent: quoted, stored but not logged.
        raise PermanentError(
            f"{delivery.source} write-back for ticket {delivery.ticket_id}: "
            f"its external id is not a {delivery.source} ticket number",
            quoted=repr(number[:40]),
            ticket_id=delivery.ticket_id,
            stage="deliver",
        )
    return number


def has_note(items: object, title: str, *fields: str) -> bool:
    """Whether a helpdesk's comments or conversations (a list of objects, as its API answers)
    include one whose text carries `title`, read from the first of `fields` it has."""
    if not isinstance(items, list):
        return False
    return any(
        title in str(next((item[f] for f in fields if item.get(f)), ""))
        for item in items
        if isinstance(item, dict)
    )


def note_title(delivery: Delivery) -> str:
    # The marker lets the source drop the webhook the helpdesk sends for this very note;
    # the dispatch id lets a writer see that a retried delivery already wrote it.
    where = "human review" if delivery.needs_review else (delivery.department or delivery.route)
    return f"{TRIAGE_NOTE_MARKER} dispatch {delivery.dispatch_id}: routed to {where}"


def note_text(delivery: Delivery, left: Sequence[str] = ()) -> str:
    """The note; `left` names the fields (group, priority) triage did not set because an agent
    had changed them (`agent_wins`)."""
    label = delivery.label
    lines = [note_title(delivery)]
    if label:
        lines.append(
            f"intent {label.get('intent')}, priority {label.get('priority')}, "
            f"sentiment {label.get('sentiment')}, language {label.get('language')}, "
            f"confidence {float(label.get('confidence', 0)):.2f}"
        )
        lines.append(f"summary: {label.get('summary')}")
    if delivery.review_reason:
        lines.append(f"review: {delivery.review_reason}")
    lines.extend(f"{name} left as an agent set it" for name in left)
    return "\n".join(lines)


class Unreported(enum.Enum):
    """A field the webhook did not carry: what the ticket had then is not known."""

    UNREPORTED = "unreported"


UNREPORTED = Unreported.UNREPORTED

# A group, queue or priority as a helpdesk's API names it: an id or a word.
FieldValue = int | str


@dataclass(frozen=True, slots=True)
class FieldWrite:
    """What a write-back does with one field of the ticket (its group, its priority)."""

    name: str
    # The value to send; None: the field is not sent.
    value: FieldValue | None
    # An agent changed it since the webhook: triage leaves it and says so in its note.
    left: bool = False


def reported_number(metadata: Mapping[str, object], key: str) -> int | Unreported | None:
    """A group, queue or priority number as the webhook reported it: a number, or the text of
    one (a placeholder renders text); blank for none. Missing, or anything else: unreported."""
    value = metadata.get(key)
    if value is None or isinstance(value, bool):
        return UNREPORTED
    text = str(value).strip()
    if not text:
        return None
    return int(text) if text.isascii() and text.isdigit() else UNREPORTED


def needs_current(ours: FieldValue | None, reported: FieldValue | Unreported | None) -> bool:
    """Whether deciding the field takes the helpdesk's current value (a request to read it)."""
    return ours is not None and reported is not UNREPORTED


def agent_wins(
    name: str,
    ours: FieldValue | None,
    reported: FieldValue | Unreported | None,
    current: FieldValue | None,
) -> FieldWrite:
    """The rule for group and priority: triage sets its value only while the field is still
    what the helpdesk reported with the webhook triage routed; a person who changed it since
    (a write-back late after an outage, a reprocess of old tickets) keeps their value. A field
    the webhook did not carry is set, as there is nothing to tell a change by. Values are
    compared as the writer normalised them (None: the ticket had none)."""
    if ours is None:
        return FieldWrite(name, None)
    if reported is UNREPORTED or current == reported:
        return FieldWrite(name, ours)
    # Already what triage would set: nothing to write, and nothing lost to mention.
    return FieldWrite(name, None, left=current != ours)


def left_fields(writes: Iterable[FieldWrite], what: str) -> list[str]:
    """The names of the fields left as an agent set them, logged (no customer text)."""
    left = [write.name for write in writes if write.left]
    for name in left:
        log.info("%s: %s left as an agent set it since the webhook", what, name)
    return left


REVIEW_TAG = "triage_review"


def triage_tag(name: str) -> str:
    return f"triage_{name}"


def triage_tags(delivery: Delivery) -> list[str]:
    tags = [triage_tag(delivery.label["intent"])] if delivery.label.get("intent") else []
    if delivery.department:
        tags.append(triage_tag(delivery.department))
    if delivery.needs_review:
        tags.append(REVIEW_TAG)
    return list(dict.fromkeys(tags))


def possible_tags(intents: Iterable[str], departments: Iterable[str]) -> frozenset[str]:
    """Every tag triage can write under a taxonomy. A ticket routed again (new customer text,
    a reprocess) loses those of its earlier routing that no longer apply: left, a view or
    trigger on `triage_billing` would still take a ticket now routed to tech_support. Tags
    outside this set are the agents', even ones that happen to start with `triage_`."""
    return frozenset(
        [*(triage_tag(i) for i in intents), *(triage_tag(d) for d in departments), REVIEW_TAG]
    )


class HelpdeskWriteBack:
    """The "helpdesk" sink: applies the result where the ticket came from."""

    name = "helpdesk"

    def __init__(self, writers: Mapping[str, Sink]) -> None:
        self.writers = dict(writers)

    @property
    def max_requests(self) -> int:
        # A department's tickets may come from any source: the most of any writer.
        return max((writer.max_requests for writer in self.writers.values()), default=0)

    def deliver(self, delivery: Delivery) -> None:
        writer = self.writers.get(delivery.source)
        if writer is None:
            log.debug("no write-back configured for source %s", delivery.source)
            return
        writer.deliver(delivery)
