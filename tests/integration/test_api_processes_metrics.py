"""`triage serve --workers N`: /metrics sums what every API process counted, whichever process
answers the scrape. A real uvicorn process manager over PostgreSQL and Redis."""

from __future__ import annotations

import json
import re

import httpx

from tests.support.stack import served_api, signed_headers, stack_env, ticket_payload, truncate

POSTS = 40
SCRAPES = 12


def _accepted(metrics: str) -> float:
    pattern = r'^triage_webhooks_total\{source="generic",status="202"\} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, metrics, flags=re.MULTILINE))


def test_every_scrape_counts_the_webhooks_all_processes_accepted(pg_url, clean_redis, tmp_path):
    truncate(pg_url)
    # A temporary directory of its own: other test processes serve APIs beside this one.
    env = stack_env(pg_url, clean_redis, TMPDIR=str(tmp_path))
    with served_api(env, workers=2) as api:
        for i in range(POSTS):
            body = json.dumps(ticket_payload(f"mp-{i}")).encode()
            # A connection per request, so the kernel spreads them over both processes.
            resp = httpx.post(
                f"{api.url}/webhooks/generic", content=body, headers=signed_headers(body)
            )
            assert resp.status_code == 202, resp.text
        seen = [_accepted(httpx.get(f"{api.url}/metrics").text) for _ in range(SCRAPES)]
    assert seen == [POSTS] * SCRAPES, api.output[-3000:]
    # The directory the processes shared is gone with them (a later run must not add to it).
    assert list(tmp_path.glob("triage-metrics-*")) == []
