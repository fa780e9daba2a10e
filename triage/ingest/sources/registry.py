"""The sources triage accepts at POST /webhooks/{source}. A new helpdesk is one module in
this package and one entry here."""

from __future__ import annotations

from triage.ingest.sources.base import WebhookSource
from triage.ingest.sources.django_helpdesk import DjangoHelpdeskSource
from triage.ingest.sources.freshdesk import FreshdeskSource
from triage.ingest.sources.generic import GenericSource
from triage.ingest.sources.zendesk import ZendeskSource

SOURCES: dict[str, WebhookSource] = {
    source.name: source
    for source in (GenericSource(), ZendeskSource(), FreshdeskSource(), DjangoHelpdeskSource())
}
