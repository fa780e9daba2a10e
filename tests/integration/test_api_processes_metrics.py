"""`triage serve --workers N`: /metrics sums what every API process counted, whichever process
answers the scrape. A real uvicorn process manager over PostgreSQL and Redis."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from tests.support.stack import signed_headers, stack_env, ticket_payload, truncate, wait_until
from triage.config import PROJECT_ROOT
from triage.embedded import _free_port

POSTS = 40
SCRAPES = 12


def _accepted(metrics: str) -> float:
    pattern = r'^triage_webhooks_total\{source="generic",status="202"\} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, metrics, flags=re.MULTILINE))


def test_every_scrape_counts_the_webhooks_all_processes_accepted(pg_url, clean_redis):
    truncate(pg_url)
    before = set(Path(tempfile.gettempdir()).glob("triage-metrics-*"))
    env = stack_env(pg_url, clean_redis)
    port = _free_port()
    args = [sys.executable, "-m", "triage.cli.main", "serve", "--workers", "2", "--port", str(port)]
    proc = subprocess.Popen(
        args, env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        wait_until(up, 60, what="triage serve up")
        for i in range(POSTS):
            body = json.dumps(ticket_payload(f"mp-{i}")).encode()
            # A connection per request, so the kernel spreads them over both processes.
            resp = httpx.post(
                f"{base}/webhooks/generic", content=body, headers=signed_headers(body)
            )
            assert resp.status_code == 202, resp.text
        seen = [_accepted(httpx.get(f"{base}/metrics").text) for _ in range(SCRAPES)]
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert seen == [POSTS] * SCRAPES, output[-3000:]
    # The directory the processes shared is gone with them (a later run must not add to it).
    assert set(Path(tempfile.gettempdir()).glob("triage-metrics-*")) == before
