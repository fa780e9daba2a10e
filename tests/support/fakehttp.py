"""A real HTTP server on loopback that records requests and answers from a script: stands in
for a helpdesk's REST API or a department's webhook receiver in tests."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    # The client's port: two requests on one kept-alive connection share it.
    port: int = 0

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
    # Seconds before each byte of the status line and headers, sent one at a time: an answer
    # whose headers never finish, though no single read waits as long as the read timeout.
    header_pace: float = 0.0


# What answers a request with no scripted reply left: (method, path, body) to a reply, or None
# for the default.
Behaviour = Callable[[str, str, bytes], "Reply | None"]


class FakeApi:
    """A real HTTP server on loopback that records requests and answers from a script, then
    from `behaviour` (a helpdesk's own, such as FakeZendesk), then with `default` (200 {})."""

    def __init__(self, behaviour: Behaviour | None = None, *, keep_alive: bool = False) -> None:
        self.requests: list[Recorded] = []
        self.replies: dict[tuple[str, str], list[Reply]] = {}
        self.behaviour = behaviour
        # Answer for requests with no scripted reply left.
        self.default = Reply()
        api = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0 closes the connection after each answer; 1.1 keeps it for the next.
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                api.requests.append(
                    Recorded(
                        self.command,
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        body,
                        self.client_address[1],
                    )
                )
                queue = api.replies.get((self.command, self.path)) or []
                reply = queue.pop(0) if queue else None
                if reply is None and api.behaviour is not None:
                    reply = api.behaviour(self.command, self.path, body)
                reply = reply or api.default
                if reply.delay:
                    time.sleep(reply.delay)
                payload = b"" if reply.status == 204 else json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    if reply.header_pace:
                        self._paced_headers(reply.header_pace)
                    else:
                        self.end_headers()
                    _write(self.wfile, payload, reply.trickle)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left, which is what the test wanted

            def _paced_headers(self, pace: float) -> None:
                # What end_headers would send at once (http.server keeps the lines in
                # _headers_buffer until then), a byte at a time.
                self._headers_buffer.append(b"\r\n")
                head = b"".join(self._headers_buffer)
                self._headers_buffer = []
                for byte in head:
                    time.sleep(pace)
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()

            # http.server's names.
            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle  # noqa: N815

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


ZENDESK_CLOSED = {
    "error": "RecordInvalid",
    "description": "Record validation errors",
    "details": {"status": [{"description": "Status: closed prevents ticket update"}]},
}
ZENDESK_CONFLICT = {
    "error": "UpdateConflict",
    "description": "The ticket was updated after the updated_stamp given with safe_update",
}


@dataclass
class ZendeskTicket:
    tags: list[str] = field(default_factory=list)
    status: str = "open"
    group_id: int | None = None
    priority: str | None = None
    # Oldest first, as Zendesk keeps them.
    comments: list[dict[str, Any]] = field(default_factory=list)
    # Advanced by every write (`FakeZendesk.updated`); what `updated_stamp` is compared with.
    updated_at: datetime = field(default_factory=lambda: datetime(2026, 11, 27, 9, tzinfo=UTC))

    @property
    def stamp(self) -> str:
        # As Zendesk renders it: ISO 8601, whole seconds, UTC.
        return self.updated_at.strftime("%Y-%m-%dT%H:%M:%SZ")


_ZD_TICKET = re.compile(r"/api/v2/tickets/(\d+)(\.json|/tags|/comments\.json)(\?.*)?$")


class FakeZendesk:
    """Zendesk's ticket API as far as the write-back uses it, with Zendesk's semantics, as
    documented: a ticket (its group, priority, status, tags); its newest comments;
    `PUT .../tags` adds the tags listed, keeping the others; `DELETE .../tags` removes only
    those listed; an update of one ticket sets group, priority and `tags` (all of them,
    replacing) and adds its comment. `additional_tags` and `remove_tags` are documented only
    for Update Many Tickets: an update of one ticket ignores them. A closed ticket answers
    any write 422 "closed prevents ticket update". Every write advances the ticket's
    `updated_at`; an update with `safe_update` whose `updated_stamp` is older (or missing)
    answers 409 "UpdateConflict" and changes nothing.

    `after_next_read` runs a change once, right after the next read of the ticket is answered:
    an agent's update landing between a writer's read and its update."""

    def __init__(self) -> None:
        self.tickets: dict[int, ZendeskTicket] = {}
        # Reentrant: a change run after a read (under the lock) may call `update_by_agent`.
        self.lock = threading.RLock()
        self.after_read: dict[int, Callable[[], None]] = {}

    def ticket(self, number: int, **fields: Any) -> ZendeskTicket:
        self.tickets[number] = ZendeskTicket(**fields)
        return self.tickets[number]

    def update_by_agent(self, number: int, **fields: Any) -> None:
        """An agent's update of the ticket in Zendesk's UI: these fields, a new `updated_at`."""
        with self.lock:
            ticket = self.tickets[number]
            for name, value in fields.items():
                setattr(ticket, name, value)
            self.updated(ticket)

    def after_next_read(self, number: int, change: Callable[[], None]) -> None:
        self.after_read[number] = change

    @staticmethod
    def updated(ticket: ZendeskTicket) -> None:
        ticket.updated_at += timedelta(seconds=1)

    def __call__(self, method: str, path: str, body: bytes) -> Reply | None:
        match = _ZD_TICKET.match(path)
        if not match or int(match[1]) not in self.tickets:
            return None
        number = int(match[1])
        with self.lock:
            reply = self._answer(method, self.tickets[number], match[2], body)
            if method == "GET" and match[2] == ".json" and number in self.after_read:
                self.after_read.pop(number)()
            return reply

    def _answer(self, method: str, ticket: ZendeskTicket, what: str, body: bytes) -> Reply:
        if method == "GET" and what == "/comments.json":
            return Reply(body={"comments": list(reversed(ticket.comments))})
        if method == "GET" and what == ".json":
            return Reply(body={"ticket": self._shown(ticket)})
        if (method, what) not in {("PUT", "/tags"), ("DELETE", "/tags"), ("PUT", ".json")}:
            return Reply(status=404, body={"error": "InvalidEndpoint"})
        if ticket.status == "closed":
            return Reply(status=422, body=ZENDESK_CLOSED)
        sent = json.loads(body)
        if what == "/tags":
            listed = sent["tags"]
            self.updated(ticket)
            if method == "PUT":
                ticket.tags += [tag for tag in listed if tag not in ticket.tags]
                return Reply(body={"tags": ticket.tags})
            ticket.tags = [tag for tag in ticket.tags if tag not in listed]
            return Reply(status=204)
        update = sent["ticket"]
        if update.get("safe_update") and _stale(ticket, update.get("updated_stamp")):
            return Reply(status=409, body=ZENDESK_CONFLICT)
        self.updated(ticket)
        ticket.group_id = update.get("group_id", ticket.group_id)
        ticket.priority = update.get("priority", ticket.priority)
        ticket.tags = update.get("tags", ticket.tags)
        if "comment" in update:
            ticket.comments.append({"id": len(ticket.comments) + 1, **update["comment"]})
        return Reply(body={"ticket": self._shown(ticket)})

    @staticmethod
    def _shown(ticket: ZendeskTicket) -> dict[str, Any]:
        return {
            "tags": ticket.tags,
            "status": ticket.status,
            "group_id": ticket.group_id,
            "priority": ticket.priority,
            "updated_at": ticket.stamp,
        }


def _stale(ticket: ZendeskTicket, stamp: object) -> bool:
    """Whether the ticket was updated after `stamp`. One that does not parse, or has no zone
    (comparing it raises TypeError), says nothing: an update guarded by it is refused too."""
    try:
        return ticket.updated_at > datetime.fromisoformat(str(stamp))
    except (TypeError, ValueError):
        return True


@contextmanager
def running_api(
    behaviour: Behaviour | None = None, *, keep_alive: bool = False
) -> Iterator[FakeApi]:
    fake = FakeApi(behaviour, keep_alive=keep_alive)
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()
