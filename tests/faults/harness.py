"""What a fault scenario needs besides the servers: a department consumer that records what it
actually received, a stack (API in-process, workers as real processes), and the audit that
checks every accepted ticket after the fault."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from tests.support.stack import post_ticket, ticket_payload, wait_until
from triage.config import PROJECT_ROOT
from triage.db.models import (
    TERMINAL_STATES,
    Attempt,
    Classification,
    DeadLetter,
    Dispatch,
    OutboxMessage,
    Ticket,
)

CONSUMER_SECRET = "whsec_" + "ZmF1bHQtdGVzdC1jb25zdW1lci1zZWNyZXQtMDEyMzQ1"
FIGURES_FILE = PROJECT_ROOT / "var" / "fault-figures.json"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The listen backlog, read when the socket starts listening (in the constructor): workers
    # deliver in bursts of a hundred at once, and the default of 5 reset some connections.
    request_queue_size = 1024


class ConsumerReceiver:
    """The department's side of the outbound webhook: records every delivery it accepted,
    by `webhook-id` (one per dispatch), exactly as a consumer would see them."""

    def __init__(self) -> None:
        self.received: Counter[str] = Counter()
        self.tickets: dict[str, int] = {}
        self.times: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                msg_id = self.headers.get("webhook-id", "")
                with receiver.lock:
                    receiver.received[msg_id] += 1
                    receiver.tickets[msg_id] = int(body["data"]["ticket_id"])
                    receiver.times.setdefault(msg_id, []).append(time.monotonic())
                self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    def reset(self) -> None:
        with self.lock:
            self.received.clear()
            self.tickets.clear()
            self.times.clear()

    def snapshot(self) -> tuple[Counter[str], dict[str, int]]:
        with self.lock:
            return Counter(self.received), dict(self.tickets)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def config_dir_with_consumer(receiver: ConsumerReceiver) -> Path:
    """A copy of config/ whose sinks.yaml sends every department (and review) to `receiver`."""
    target = Path(tempfile.mkdtemp(prefix="triage-config-"))
    shutil.copytree(PROJECT_ROOT / "config", target, dirs_exist_ok=True)
    (target / "sinks.yaml").write_text(
        "timeout_seconds: 3\n"
        "webhooks:\n"
        "  consumer:\n"
        f"    url: {receiver.url}\n"
        "    secret_env: TRIAGE_SINK_SECRET_CONSUMER\n"
        "default: [webhook:consumer]\n"
    )
    return target


def post_tickets(client: Any, bodies: list[tuple[str, str]], *, threads: int = 8) -> list[int]:
    """Post (external_id, body) pairs; returns the ids of the accepted (202) tickets."""

    def one(item: tuple[str, str]) -> int | None:
        resp = post_ticket(client, ticket_payload(item[0], body=item[1]))
        return int(resp.json()["ticket_id"]) if resp.status_code == 202 else None

    with ThreadPoolExecutor(threads) as pool:
        return [tid for tid in pool.map(one, bodies) if tid is not None]


@dataclass
class Figures:
    scenario: str
    sent: int
    accepted: int
    routed: int = 0
    review: int = 0
    dead_lettered: int = 0
    lost: int = 0
    duplicated_dispatches: int = 0
    # Tickets the department consumer received under more than one dispatch: a true
    # duplicate delivery, which no receiver could tell apart.
    duplicated_received: int = 0
    # The same dispatch (same webhook-id) POSTed again: a worker died between the sink's
    # answer and recording it. At-least-once; the consumer drops it by webhook-id.
    redelivered_same_id: int = 0
    extra_classifications: int = 0
    api_calls: int = 0
    api_call_bound: int = 0
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"{self.scenario}: sent={self.sent} accepted={self.accepted} routed={self.routed} "
            f"review={self.review} dead={self.dead_lettered} lost={self.lost} "
            f"dup_dispatch={self.duplicated_dispatches} dup_received={self.duplicated_received} "
            f"redelivered_same_id={self.redelivered_same_id} "
            f"api_calls={self.api_calls} (bound {self.api_call_bound}) {self.seconds:.0f}s "
            f"{self.notes or ''}"
        )


COLLECTED: list[Figures] = []


def record(figures: Figures) -> None:
    COLLECTED.append(figures)
    print(figures.line())
    record_file(figures)


def record_file(figures: Figures) -> None:
    FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(FIGURES_FILE.read_text()) if FIGURES_FILE.exists() else {}
    existing[figures.scenario] = asdict(figures)
    FIGURES_FILE.write_text(json.dumps(existing, indent=2))


def wait_settled(rt: Any, receiver: ConsumerReceiver, ids: list[int], timeout: float) -> None:
    """Until every accepted ticket is terminal, every current dispatch delivered and received,
    and no outbox message is waiting: the pipeline has nothing left to do for them."""
    terminal = [s.value for s in TERMINAL_STATES]
    last: dict[str, Any] = {}

    def settled() -> bool:
        try:
            with rt.sessions() as s:
                done = s.scalar(
                    select(func.count()).where(Ticket.id.in_(ids), Ticket.state.in_(terminal))
                )
                undelivered = s.scalar(
                    select(func.count())
                    .select_from(Dispatch)
                    .join(Ticket, Ticket.id == Dispatch.ticket_id)
                    .where(Dispatch.delivered_at.is_(None), Ticket.state != "dead_lettered")
                )
                delivered = s.scalar(select(func.count()).where(Dispatch.delivered_at.is_not(None)))
                pending = s.scalar(select(func.count()).where(OutboxMessage.sent_at.is_(None)))
        except Exception:  # the database may be the thing that is down
            return False
        received, _ = receiver.snapshot()
        last.update(
            terminal=done,
            undelivered=undelivered,
            outbox_pending=pending,
            delivered=delivered,
            received=len(received),
        )
        return done == len(ids) and undelivered == 0 and pending == 0 and len(received) >= delivered

    try:
        wait_until(settled, timeout, what=f"{len(ids)} tickets to settle", every=1.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {last}; {states(rt, ids)}") from None


def states(rt: Any, ids: list[int]) -> str:
    """Where the tickets are, for a failure message."""
    try:
        with rt.sessions() as s:
            rows = s.execute(
                select(Ticket.state, func.count()).where(Ticket.id.in_(ids)).group_by(Ticket.state)
            ).all()
    except Exception as exc:  # the database may be the thing that is down
        return f"states unknown ({exc})"
    return "states " + ", ".join(f"{state}={n}" for state, n in rows)


def audit(
    scenario: str,
    rt: Any,
    receiver: ConsumerReceiver,
    *,
    sent: int,
    ids: list[int],
    api_calls: int,
    max_attempts: int,
    calls_per_attempt: int = 1,
    started: float,
) -> Figures:
    """Count every accepted ticket's outcome, and every way it could have been lost or
    delivered twice."""
    received, received_tickets = receiver.snapshot()
    fig = Figures(scenario=scenario, sent=sent, accepted=len(ids))
    with rt.sessions() as s:
        states = dict(s.execute(select(Ticket.id, Ticket.state).where(Ticket.id.in_(ids))).all())
        per_ticket_dispatches = Counter(
            s.scalars(select(Dispatch.ticket_id).where(Dispatch.ticket_id.in_(ids))).all()
        )
        per_ticket_labels = Counter(
            s.scalars(
                select(Classification.ticket_id).where(Classification.ticket_id.in_(ids))
            ).all()
        )
        open_letters = Counter(
            s.scalars(
                select(DeadLetter.ticket_id).where(
                    DeadLetter.ticket_id.in_(ids), DeadLetter.replayed_at.is_(None)
                )
            ).all()
        )
        dispatch_ids = dict(
            s.execute(
                select(Dispatch.id, Dispatch.ticket_id).where(Dispatch.ticket_id.in_(ids))
            ).all()
        )
        attempts = dict(
            s.execute(select(Ticket.id, Ticket.attempts).where(Ticket.id.in_(ids))).all()
        )
        # A delivery whose request went out but whose answer never came back (a connection
        # reset or closed mid-read) is retried: the sink may have it already. Such a retry is
        # recorded as a failed deliver attempt.
        retried_deliveries = set(
            s.scalars(
                select(Attempt.ticket_id).where(
                    Attempt.ticket_id.in_(ids),
                    Attempt.stage == "deliver",
                    Attempt.outcome == "retry",
                )
            ).all()
        )
    counts = Counter(states.values())
    fig.routed = counts.get("routed", 0)
    fig.review = counts.get("needs_review", 0)
    fig.dead_lettered = counts.get("dead_lettered", 0)
    fig.lost = len(ids) - fig.routed - fig.review - fig.dead_lettered
    fig.duplicated_dispatches = sum(n - 1 for n in per_ticket_dispatches.values() if n > 1)
    fig.extra_classifications = sum(n - 1 for n in per_ticket_labels.values() if n > 1)
    # What the department consumer saw: one webhook per dispatch, one dispatch per ticket.
    fig.redelivered_same_id = sum(n - 1 for n in received.values() if n > 1)
    fig.notes["redelivered_unexplained"] = sum(
        n - 1
        for m, n in received.items()
        if n > 1 and received_tickets[m] not in retried_deliveries
    )
    with receiver.lock:
        fig.notes["redelivered_after_s"] = [
            round(t[-1] - t[0], 2) for t in receiver.times.values() if len(t) > 1
        ]
    tickets_received = Counter(received_tickets.values())
    fig.duplicated_received = sum(n - 1 for n in tickets_received.values() if n > 1)
    fig.notes["received"] = len(received)
    routed_ids = [t for t, st in states.items() if st in ("routed", "needs_review")]
    received_for = {received_tickets[m] for m in received if m.startswith("dispatch_")}
    fig.notes["routed_not_received"] = sum(1 for t in routed_ids if t not in received_for)
    fig.notes["received_unknown_dispatch"] = sum(
        1 for m in received if int(m.removeprefix("dispatch_")) not in dispatch_ids
    )
    fig.notes["dead_without_letter"] = sum(
        1 for t, st in states.items() if st == "dead_lettered" and open_letters[t] != 1
    )
    fig.notes["max_attempts_seen"] = max(attempts.values(), default=0)
    fig.api_calls = api_calls
    fig.api_call_bound = len(ids) * max_attempts * calls_per_attempt
    fig.seconds = time.monotonic() - started
    record(fig)
    return fig


def assert_nothing_lost_or_doubled(fig: Figures, *, workers_died: bool = False) -> None:
    """`workers_died`: a worker killed (or cut off from its database) after a sink answered
    and before the delivery was recorded sends that same dispatch again. Otherwise a dispatch
    is sent again only after a recorded failed attempt to deliver it (its answer lost)."""
    assert fig.lost == 0, fig.line()
    assert fig.duplicated_dispatches == 0, fig.line()
    assert fig.duplicated_received == 0, fig.line()
    assert fig.extra_classifications == 0, fig.line()
    if not workers_died:
        assert fig.notes["redelivered_unexplained"] == 0, fig.line()
    assert fig.notes["routed_not_received"] == 0, fig.line()
    assert fig.notes["dead_without_letter"] == 0, fig.line()
    assert fig.api_calls <= fig.api_call_bound, fig.line()
