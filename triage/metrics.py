"""Prometheus metrics. The API serves its process's registry at /metrics; a worker serves its
own on TRIAGE_WORKER_METRICS_PORT when set."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

WEBHOOKS = Counter(
    "triage_webhooks_total", "Webhook requests by source and HTTP status", ["source", "status"]
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
    "Backend latency per label",
    ["backend"],
    buckets=(0.005, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
)
CLASSIFY_TOKENS = Counter(
    "triage_tokens_total", "Model tokens by model and kind", ["model", "kind"]
)
CLASSIFY_COST = Counter("triage_cost_usd_total", "Model spend in USD by model", ["model"])
STAGE_FAILURES = Counter(
    "triage_stage_failures_total", "Stage failures by stage and outcome", ["stage", "outcome"]
)
SINK_SKIPPED = Counter(
    "triage_sink_skipped_total",
    "Deliveries a sink accepted without writing anything, by sink and reason",
    ["sink", "reason"],
)
BATCH_SIZE = Histogram(
    "triage_batch_ids",
    "Tickets (classify) or dispatches (deliver) per task message",
    ["stage"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
