"""Signed webhook posts from the measuring process: as fast as a fixed number of clients can
(closed loop), or at a fixed offered rate (open loop, one event loop, no client threads)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

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
        f"Could you please look into it today? Thanks, Customer {i}",
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


class _Connection:
    """One HTTP/1.1 keep-alive connection speaking just enough of the protocol for webhook
    posts. Not httpx: its per-request cost (about 2 ms of CPU here) ran on the same two cores
    as triage and was a quarter of the CPU-bound scenario's budget."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def post(self, host: str, path: str, body: bytes) -> tuple[int, bool]:
        """The status, and whether the connection may be used again."""
        head = "".join(f"{k}: {v}\r\n" for k, v in signed_headers(body).items())
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(body)}\r\n"
            f"{head}\r\n".encode()
            + body
        )
        await self.writer.drain()
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
        fields = {k.strip().lower(): v.strip() for k, v in headers.items()}
        await self.reader.readexactly(int(fields.get("content-length", "0")))
        return status, fields.get("connection", "").lower() != "close"

    def close(self) -> None:
        self.writer.close()


class _Stale(Exception):
    """A reused connection was closed by the server before it answered anything."""


class _Pool:
    """Idle connections to the API, opened as needed, at most `size`."""

    def __init__(self, url: str, size: int) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = parts.path
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(size)

    async def post(self, body: bytes) -> tuple[int, float]:
        started = time.perf_counter()
        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            try:
                status = await self._post_on(conn, body)
            except _Stale:
                # A kept-alive connection the server closed while it sat idle (uvicorn does
                # after 5 s): nothing came back, so it is sent again on a new connection, as
                # an HTTP client's pool does. On a new connection this is a failure.
                try:
                    status = await self._post_on(None, body)
                except _Stale:
                    status = 0
        return status, time.perf_counter() - started

    async def _post_on(self, conn: _Connection | None, body: bytes) -> int:
        """The status (0: failed); raises _Stale when a reused connection was closed."""
        reused = conn is not None
        try:
            if conn is None:
                conn = await _Connection.open(self.host, self.port)
            status, reusable = await asyncio.wait_for(
                conn.post(self.host, self.path, body), timeout=30
            )
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
            if conn is not None:
                conn.close()
            if reused and not getattr(exc, "partial", b""):
                raise _Stale from exc
            return 0
        except (TimeoutError, OSError, asyncio.LimitOverrunError, ValueError):
            if conn is not None:
                conn.close()
            return 0
        if reusable:
            self._idle.append(conn)
        else:
            conn.close()
        return status

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


async def _closed_loop(url: str, bodies: list[bytes], clients: int) -> list[Sample]:
    samples: list[Sample] = []
    queue = iter(bodies)
    pool = _Pool(url, clients)

    async def one_client() -> None:
        for body in queue:
            status, latency = await pool.post(body)
            samples.append(Sample(status, latency, 0.0))

    try:
        await asyncio.gather(*(one_client() for _ in range(clients)))
    finally:
        pool.close()
    return samples


async def _open_loop(url: str, bodies: list[bytes], rate: float) -> list[Sample]:
    samples: list[Sample] = []
    pool = _Pool(url, 512)
    start = time.perf_counter()

    async def one(i: int, body: bytes) -> None:
        due = start + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        lag = max(0.0, time.perf_counter() - due)
        status, latency = await pool.post(body)
        samples.append(Sample(status, latency, lag))

    try:
        await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
    finally:
        pool.close()
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
