"""`triage run`: the whole thing on one machine, showing the sample tickets being triaged.

With nothing configured it uses a SQLite file, an embedded Redis and the offline backend; with
DATABASE_URL, REDIS_URL and ANTHROPIC_API_KEY set it uses those instead.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import typer
from rich.live import Live
from rich.table import Table
from rich.text import Text
from sqlalchemy import select

from triage.cli.common import (
    console,
    fail,
    guarded,
    load_runtime,
    plain,
    stop_if_broker_unreachable,
)
from triage.cli.send import post_generic

if TYPE_CHECKING:
    from triage.embedded import EmbeddedRedis

app = typer.Typer()


@app.command()
@guarded
def run(
    samples: Path = typer.Option(
        None, help="Folder of generic-webhook JSON tickets. Default: <config dir>/samples."
    ),
    port: int = typer.Option(0, min=0, max=65535, help="API port (0: a free one)."),
    concurrency: int = typer.Option(50, help="Worker threads."),
    exit_when_done: bool = typer.Option(
        False, help="Stop once every sample is routed, in review or dead-lettered."
    ),
    timeout: float = typer.Option(300.0, help="With --exit-when-done: give up after this long."),
    var: Path = typer.Option(
        None, help="Folder for the logs and the embedded Redis. Default: <project>/var."
    ),
) -> None:
    """Start the API and a worker, post the samples through the signed webhook, and show
    them being routed. Ctrl-C stops everything.

    Example: triage run --exit-when-done
    """
    from triage.config import PROJECT_ROOT, Settings
    from triage.db.migrate import upgrade
    from triage.embedded import EmbeddedRedis, free_port

    # Ctrl-C and a plain `kill` both stop everything in order (SIGINT is ignored when a
    # shell starts us in the background; this demo should still stop on it).
    var = var or PROJECT_ROOT / "var"
    _require_writable(var)
    if port and not _port_is_free(port):
        fail(f"port {port} on 127.0.0.1 is in use: pass another --port, or none for a free one")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    settings = Settings()
    env = dict(os.environ)
    redis: EmbeddedRedis | None = None
    children: list[_Child] = []
    try:
        if not settings.effective_broker_url():
            # Assigned before it starts, so a Ctrl-C while it starts still stops it.
            redis = EmbeddedRedis(var / "redis")
            redis.start()
            env["REDIS_URL"] = redis.url
            console.print(f"embedded Redis on {redis.url}")
        else:
            # Otherwise the samples wait in the outbox and the table sits at "queued".
            stop_if_broker_unreachable(load_runtime(), "no ticket could reach the worker")
        own_secret = settings.webhook_secret("generic")
        secret = own_secret or "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        env["TRIAGE_WEBHOOK_SECRET_GENERIC"] = secret
        upgrade(settings.database_url)
        backend = Settings().effective_backend()
        console.print(
            f"database {settings.database_url.split('@')[-1]} migrated; backend {backend}"
        )
        if redis is not None:
            _resend_unfinished(redis.url)
        port = port or free_port()
        worker_args = ["worker", "-c", str(concurrency), "--loglevel", "WARNING"]
        children.append(_spawn("the worker", worker_args, env, var))
        children.append(_spawn("the API", ["serve", "--port", str(port)], env, var))
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, children)
        folder = samples or settings.config_dir / "samples"
        ids, stored_before = _post_samples(base, folder, secret)
        console.print(_posted_line(len(ids), stored_before, base), soft_wrap=True)
        done = _watch(settings.database_url, ids, children, timeout if exit_when_done else None)
        if exit_when_done and not done:
            fail(f"not every sample reached a terminal state within {timeout:.0f}s")
        if not exit_when_done:
            newest = _newest_ticket_id(settings.database_url)
            demo_secret = None if own_secret else secret
            shown = _still_running(base, var, concurrency, backend, redis, demo_secret)
            # soft_wrap: the `triage send` line stays one line to copy, however narrow the screen.
            console.print(shown, highlight=False, soft_wrap=True)
            _follow(settings.database_url, newest, children)
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        # A second Ctrl-C while the children stop would leave them running and print a
        # traceback; the stop below is bounded instead.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop(children)
        if redis is not None:
            redis.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@dataclass(frozen=True)
class _Child:
    name: str
    log: Path
    proc: subprocess.Popen[bytes]

    def exited(self) -> str | None:
        """Why this child is gone (its exit code and its log's last line), or None."""
        if self.proc.poll() is None:
            return None
        lines = self.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        last = f": {lines[-1].strip()}" if lines else ""
        return f"{self.name} exited with {self.proc.returncode}{last} (log: {self.log})"


def _resend_unfinished(broker_url: str) -> None:
    """A new embedded Redis starts empty: messages an earlier run left in its own (stopped
    mid-way) went with it. Send those tickets again now, not after the sweeper's deadline
    (`stuck_after_seconds`, minutes), while the table would sit at "queued"."""
    from triage.config import Settings, load_config
    from triage.pipeline.runtime import Runtime
    from triage.reliability.sweeper import sweep_once

    settings = Settings().model_copy(update={"redis_url": broker_url})
    report = sweep_once(Runtime(load_config(settings)), stuck_after=1)
    if report.requeued_tickets:
        console.print(f"sent {report.requeued_tickets} tickets an earlier run left unfinished")


def _require_writable(var: Path) -> None:
    # The SQLite file, the logs and the embedded Redis live here; find out now, in one line,
    # rather than from a traceback halfway through starting.
    try:
        var.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=var):
            pass
    except OSError as exc:
        fail(f"{var} must be a writable folder (logs and the embedded Redis go there): {exc}")


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _spawn(name: str, args: list[str], env: dict[str, str], var: Path) -> _Child:
    log = var / f"{args[0]}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "triage.cli.main", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Own process group: Ctrl-C reaches us once and we stop the children in order.
            start_new_session=True,
        )
    return _Child(name, log, proc)


def _wait_healthy(base: str, children: list[_Child], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children:
            if gone := child.exited():
                fail(gone)
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    fail(f"API did not come up on {base} within {timeout:.0f}s")


def _post_samples(base: str, folder: Path, secret: str) -> tuple[list[int], int]:
    """Post every sample; return the tickets' ids and how many an earlier run had stored.
    Samples keep their external ids, so a second `make run` finds its tickets instead of
    classifying (and, with an API key, paying for) the same forty again."""
    files = sorted(folder.glob("*.json"))
    if not files:
        fail(f"no sample tickets in {folder}")
    ids: list[int] = []
    stored_before = 0
    with httpx.Client(base_url=base, timeout=10) as client:
        for path in files:
            payload: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            resp = post_generic(client, payload, secret)
            if resp.status_code != 202:
                fail(f"{path.name}: webhook answered {resp.status_code}: {resp.text}")
            answer = resp.json()
            ids.append(int(answer["ticket_id"]))
            stored_before += bool(answer["duplicate"])
    return ids, stored_before


def _posted_line(posted: int, stored_before: int, base: str) -> str:
    where = f"{base}/webhooks/generic"
    if not stored_before:
        return f"posted {posted} sample tickets to {where}"
    again = "`triage reprocess` classifies them again"
    if stored_before == posted:
        return (
            f"posted {posted} sample tickets to {where}: all were stored by an earlier run, "
            f"so they are shown as they ended then, not classified again ({again})"
        )
    return (
        f"posted {posted} sample tickets to {where}: {stored_before} were stored by an "
        f"earlier run and are not classified again ({again})"
    )


def _still_running(
    base: str,
    var: Path,
    concurrency: int,
    backend: str,
    redis: EmbeddedRedis | None,
    demo_secret: str | None,
) -> str:
    """What is left running, how to reach it, how to stop it."""
    script = Path(sys.executable).parent / "triage"
    triage = str(script) if script.exists() else "triage"
    with contextlib.suppress(ValueError):
        triage = str(script.relative_to(Path.cwd()))
    # This run's own throwaway secret must be passed along; one of the user's own is already
    # in their environment and is not echoed.
    prefix = f"TRIAGE_WEBHOOK_SECRET_GENERIC={shlex.quote(demo_secret)} " if demo_secret else ""
    broker = f"embedded Redis on {redis.url}" if redis else "the broker in REDIS_URL"
    pid = os.getpid()
    return "\n".join(
        [
            f"still running (pid {pid}); Ctrl-C or `kill {pid}` stops it all:",
            f"  API     {base}  POST /webhooks/generic, GET /tickets/{{id}}  (log {var}/serve.log)",
            f"  worker  {concurrency} threads, backend {backend}  (log {var}/worker.log)",
            f"  broker  {broker}",
            "post a ticket of your own, from another terminal in this folder:",
            f"  {prefix}{triage} send --url {base} --subject 'Charged twice' "
            "--body 'I was billed twice this month, please refund one payment.'",
            "tickets posted from now on are listed here once triaged:",
        ]
    )


def _watch(url: str, ids: list[int], children: list[_Child], timeout: float | None) -> bool:
    """Live table of the samples until they are all terminal; False when `timeout` runs out."""
    from triage.db.models import TERMINAL_STATES, Classification, Ticket
    from triage.db.session import get_sessionmaker

    sessions = get_sessionmaker(url)
    terminal = {s.value for s in TERMINAL_STATES}
    deadline = None if timeout is None else time.monotonic() + timeout
    if not console.is_terminal:
        # Piped or captured output (CI logs) gets a readable width instead of 80 columns.
        console.width = max(console.width, 132)
    started = time.monotonic()
    stmt = (
        select(Ticket, Classification)
        .outerjoin(Classification, Classification.id == Ticket.current_classification_id)
        .where(Ticket.id.in_(ids))
    )
    with Live(console=console, refresh_per_second=8) as live:
        while True:
            with sessions() as session:
                rows = session.execute(stmt).all()
            live.update(_table(rows))
            if len(rows) == len(set(ids)) and all(t.state in terminal for t, _ in rows):
                break
            if deadline is not None and time.monotonic() > deadline:
                return False
            _fail_if_exited(children)
            time.sleep(0.25)
    if not console.is_terminal:
        # Off a terminal Live leaves its last frame without a line end: the summary would
        # start on the table's bottom border.
        console.line()
    counts = Counter(t.state for t, _ in rows)
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    console.print(f"{len(rows)} tickets terminal in {time.monotonic() - started:.1f}s: {summary}")
    return True


def _newest_ticket_id(url: str) -> int:
    from sqlalchemy import func

    from triage.db.models import Ticket
    from triage.db.session import get_sessionmaker

    with get_sessionmaker(url)() as session:
        return int(session.scalar(select(func.max(Ticket.id))) or 0)


def _follow(url: str, after: int, children: list[_Child]) -> None:
    """One line per ticket past `after` as it reaches a terminal state, until interrupted."""
    from triage.db.models import TERMINAL_STATES, Classification, Ticket
    from triage.db.session import get_sessionmaker

    sessions = get_sessionmaker(url)
    terminal = [s.value for s in TERMINAL_STATES]
    shown: set[int] = set()
    while True:
        stmt = (
            select(Ticket, Classification)
            .outerjoin(Classification, Classification.id == Ticket.current_classification_id)
            .where(Ticket.id > after, Ticket.state.in_(terminal))
            .order_by(Ticket.id)
        )
        with sessions() as session:
            rows = session.execute(stmt).all()
        for ticket, label in rows:
            if ticket.id not in shown:
                shown.add(ticket.id)
                console.print(_ticket_line(ticket, label))
        _fail_if_exited(children)
        time.sleep(0.5)


def _ticket_line(ticket: Any, label: Any) -> Text:
    line = Text(f"ticket {ticket.id} ")
    line.append(repr(ticket.subject or ticket.body[:40]))
    if label is not None:
        line.append(f": {label.intent} ({label.language}, {label.confidence:.2f})")
    line.append(f" -> {ticket.department or '-'}, {ticket.state}")
    return line


def _fail_if_exited(children: list[_Child]) -> None:
    for child in children:
        if gone := child.exited():
            fail(gone)


# Each column's least width; the subject absorbs what is left, up to 40.
_COLUMNS = {
    "ticket": 6,
    "subject": 10,
    "lang": 4,
    "intent": 12,
    "department": 16,
    "conf": 4,
    "state": 13,
    "latency": 8,
}


def _table(rows: Sequence[Any], width: int | None = None) -> Table:
    width = width or console.width
    columns = dict(_COLUMNS)
    # On a narrow screen (80 columns) the latency, then the language, make way: otherwise
    # the state is cut off the right edge, and the labels, department and state are the point.
    for optional in ("latency", "lang"):
        if sum(w + 3 for w in columns.values()) + 1 <= width:
            break
        del columns[optional]
    # Rich does not narrow a no_wrap column to fit: the subject is given what is left.
    others = sum(w + 3 for col, w in columns.items() if col != "subject") + 1
    columns["subject"] = max(_COLUMNS["subject"], min(40, width - others - 3))
    table = Table(title="triage: tickets", expand=False)
    for col, least in columns.items():
        table.add_column(
            col,
            overflow="ellipsis",
            no_wrap=True,
            min_width=least,
            max_width=least if col == "subject" else None,
        )
    styles = {"routed": "green", "needs_review": "yellow", "dead_lettered": "red"}
    for ticket, label in sorted(rows, key=lambda r: r[0].id):
        latency = "-"
        if ticket.state in styles:
            latency = (
                f"{(ticket.state_changed_at - ticket.received_at).total_seconds() * 1000:.0f} ms"
            )
        cells: dict[str, Any] = {
            "ticket": str(ticket.id),
            "subject": plain(ticket.subject or ticket.body[:40]),
            "lang": plain(label.language if label else "-"),
            "intent": label.intent if label else "-",
            "department": ticket.department or "-",
            "conf": f"{label.confidence:.2f}" if label else "-",
            "state": f"[{styles.get(ticket.state, 'white')}]{ticket.state}[/]",
            "latency": latency,
        }
        table.add_row(*(cells[col] for col in columns))
    return table


def _stop(children: list[_Child]) -> None:
    # The API first, so nothing new arrives; then the worker, whose SIGTERM is Celery's warm
    # shutdown (tasks in flight finish); the embedded Redis after both, by the caller.
    for child in reversed(children):
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
        try:
            child.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()
