"""Signed webhook posts from the measuring process: as fast as a fixed number of clients can
(closed loop), or at a fixed offered rate (open loop, one event loop, no client threads)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from bench.infra import WEBHOOK_SECRET
from triage.ingest.signing import sign

SUBJECTS = (
    "Where is my order",
    "Refund for a double charge",
    "Cannot log in to my account",
    "Invoice address is wrong",
    "App crashes on start",
)


def ticket_body(run: str, i: int) -> bytes:
    """A unique ticket: identical text would reuse an earlier label and skip the model call."""
    subject = SUBJECTS[i % len(SUBJECTS)]
    payload: dict[str, Any] = {
        "external_id": f"bench-{run}-{i}",
        "subject": f"{subject} ({run}-{i})",
        "body": f"Hello, ticket {run}-{i}: {subject.lower()}. Order number {i * 7919}. "
        "Could you please look into it today? Thanks.",
        "requester": {"email": f"customer{i}@example.com", "name": f"Customer {i}"},
        "channel": "email",
        "created_at": "2026-11-24T10:00:00Z",
        "metadata": {"bench": run},
    }
    return json.dumps(payload).encode()


def signed_headers(body: bytes) -> dict[str, str]:
    msg_id = f"msg_{uuid.uuid4().hex}"
    timestamp = int(time.time())
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(WEBHOOK_SECRET, msg_id, timestamp, body),
    }


@dataclass(frozen=True, slots=True)
class Sample:
    status: int
    latency: float  # seconds, from the request's start to its answer
    lag: float  # seconds the start was late against the schedule (open loop only)


def _client(connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(limits=limits, timeout=30)


async def _post(client: httpx.AsyncClient, url: str, body: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    try:
        response = await client.post(url, content=body, headers=signed_headers(body))
        status = response.status_code
    except httpx.HTTPError:
        status = 0
    return status, time.perf_counter() - started


async def _closed_loop(url: str, bodies: list[bytes], clients: int) -> list[Sample]:
    samples: list[Sample] = []
    queue = iter(bodies)
    async with _client(clients) as client:

        async def one_client() -> None:
            for body in queue:
                status, latency = await _post(client, url, body)
                samples.append(Sample(status, latency, 0.0))

        await asyncio.gather(*(one_client() for _ in range(clients)))
    return samples


async def _open_loop(url: str, bodies: list[bytes], rate: float) -> list[Sample]:
    samples: list[Sample] = []
    async with _client(512) as client:
        start = time.perf_counter()

        async def one(i: int, body: bytes) -> None:
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            lag = max(0.0, time.perf_counter() - due)
            status, latency = await _post(client, url, body)
            samples.append(Sample(status, latency, lag))

        await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
    return samples


def post_closed_loop(base_url: str, bodies: list[bytes], *, clients: int = 32) -> list[Sample]:
    """Post every body with `clients` requests in flight; returns one sample per body."""
    return asyncio.run(_closed_loop(f"{base_url}/webhooks/generic", bodies, clients))


def post_open_loop(base_url: str, bodies: list[bytes], *, rate: float) -> list[Sample]:
    """Start request i at i/rate seconds, whatever the earlier ones are doing."""
    return asyncio.run(_open_loop(f"{base_url}/webhooks/generic", bodies, rate))


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[k]
