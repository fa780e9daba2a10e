"""The sources triage accepts at POST /webhooks/{source}."""

from __future__ import annotations

from triage.ingest.sources.base import WebhookSource
from triage.ingest.sources.generic import GenericSource

SOURCES: dict[str, WebhookSource] = {source.name: source for source in (GenericSource(),)}
