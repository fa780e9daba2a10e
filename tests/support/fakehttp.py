"""A real HTTP server on loopback that records requests and answers from a script: stands in
for a helpdesk's REST API or a department's webhook receiver in tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    # Seconds over which the body is written, a few bytes at a time: an answer that keeps
    # arriving, so no single read waits as long as a client's read timeout.
    trickle: float = 0.0


class FakeApi:
    """A real HTTP server on loopback that records requests and answers from a script
    (default: 200 {})."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.replies: dict[tuple[str, str], list[Reply]] = {}
        # Answer for requests with no scripted reply left.
        self.default = Reply()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                api.requests.append(
                    Recorded(
                        self.command,
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        body,
                    )
                )
                queue = api.replies.get((self.command, self.path)) or []
                reply = queue.pop(0) if queue else api.default
                if reply.delay:
                    time.sleep(reply.delay)
                payload = json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    _write(self.wfile, payload, reply.trickle)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left, which is what the test wanted

            do_GET = do_POST = do_PUT = do_PATCH = _handle  # noqa: N815 - http.server names

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def script(self, method: str, path: str, *replies: Reply) -> None:
        self.replies.setdefault((method, path), []).extend(replies)

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests]


TRICKLE_PIECES = 5


def _write(out: Any, payload: bytes, trickle: float) -> None:
    if not trickle:
        out.write(payload)
        return
    size = -(-len(payload) // TRICKLE_PIECES)
    for start in range(0, len(payload), size):
        time.sleep(trickle / TRICKLE_PIECES)
        out.write(payload[start : start + size])
        out.flush()


@contextmanager
def running_api() -> Iterator[FakeApi]:
    fake = FakeApi()
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
