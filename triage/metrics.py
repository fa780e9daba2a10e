"""Prometheus metrics. The API serves its process's registry at /metrics; a worker serves its
own on TRIAGE_WORKER_METRICS_PORT when set. Every label has a bounded set of values (sources,
HTTP statuses, stages, error class names, models and queues from config/): never a ticket id
or free text. The gauges read from the database and the broker when /metrics is scraped are in
`triage.pipeline.gauges`."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

WEBHOOKS = Counter(
    "triage_webhooks_total", "Webhook requests by source and HTTP status", ["source", "status"]
)
TICKETS_RECEIVED = Counter(
    "triage_tickets_received_total",
    "Webhooks answered 202, by source and outcome: new, duplicate, updated (new text on a "
    "known ticket, classified again), ignored (triage's own note, an event it does not use) or "
    "spooled (the database was down: kept on the broker until a worker can store it)",
    ["source", "outcome"],
)
INGEST_LATENCY = Histogram(
    "triage_ingest_seconds",
    "Time to verify, parse and commit a webhook",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
)
CLASSIFICATIONS = Counter(
    "triage_classifications_total",
    "Labels produced, by backend and outcome",
    ["backend", "outcome"],
)
CLASSIFY_LATENCY = Histogram(
    "triage_classify_call_seconds",
    "Time to a label, by backend and the model whose label was kept (an escalated label's "
    "time includes the first model's call; repair calls included)",
    ["backend", "model"],
    buckets=(0.005, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
)
CLASSIFY_TOKENS = Counter(
    "triage_tokens_total", "Model tokens by model and kind", ["model", "kind"]
)
CLASSIFY_COST = Counter("triage_cost_usd_total", "Model spend in USD by model", ["model"])
STAGE_FAILURES = Counter(
    "triage_stage_failures_total",
    "Failed attempts by stage, outcome (retry: scheduled again; dead: dead-lettered; noop: "
    "the work was no longer current; superseded: the attempt's claim was no longer its own) "
    "and error type (the error's class name)",
    ["stage", "outcome", "error_type"],
)
TICKETS_CLASSIFIED = Counter(
    "triage_tickets_classified_total",
    "Labels recorded, by outcome: routed (to a department), review (to human review) or "
    "superseded (another worker's or a newer generation's label stands)",
    ["outcome"],
)
SINK_SKIPPED = Counter(
    "triage_sink_skipped_total",
    "Deliveries a sink did not write, by sink and reason: one the sink accepted without "
    "writing anything (ticket_closed), or one not sent to it because it accepted the same "
    "dispatch in an earlier attempt (already_done)",
    ["sink", "reason"],
)
DEAD_NOTICES_DROPPED = Counter(
    "triage_dead_notices_dropped_total",
    "Oldest triage.dead messages dropped to keep the queue to TRIAGE_DEAD_QUEUE_MAX_LENGTH "
    "(their dead letters stay in the database)",
)
BATCH_SIZE = Histogram(
    "triage_batch_ids",
    "Tickets (classify) or dispatches (deliver) per task message",
    ["stage"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
