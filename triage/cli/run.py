"""`triage run`: the whole thing on one machine, showing the sample tickets being triaged.

With nothing configured it uses a SQLite file, an embedded Redis and the offline backend; with
DATABASE_URL, REDIS_URL and ANTHROPIC_API_KEY set it uses those instead.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import typer
from rich.live import Live
from rich.table import Table
from sqlalchemy import select

from triage.cli.common import console, fail, guarded, plain

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
) -> None:
    """Start the API and a worker, post the samples through the signed webhook, and show
    them being routed. Ctrl-C stops everything.

    Example: triage run --exit-when-done
    """
    from triage.config import PROJECT_ROOT, Settings
    from triage.db.migrate import upgrade
    from triage.embedded import EmbeddedRedis, _free_port

    # Ctrl-C and a plain `kill` both stop everything in order (SIGINT is ignored when a
    # shell starts us in the background; this demo should still stop on it).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    settings = Settings()
    var = PROJECT_ROOT / "var"
    env = dict(os.environ)
    redis: EmbeddedRedis | None = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if not settings.effective_broker_url():
            redis = EmbeddedRedis(var / "redis").start()
            env["REDIS_URL"] = redis.url
            console.print(f"embedded Redis on {redis.url}")
        secret = settings.webhook_secret("generic") or (
            "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        )
        env["TRIAGE_WEBHOOK_SECRET_GENERIC"] = secret
        upgrade(settings.database_url)
        backend = Settings().effective_backend()
        console.print(
            f"database {settings.database_url.split('@')[-1]} migrated; backend {backend}"
        )
        port = port or _free_port()
        procs.append(_spawn(["worker", "-c", str(concurrency), "--loglevel", "WARNING"], env, var))
        procs.append(_spawn(["serve", "--port", str(port)], env, var))
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, procs)
        folder = samples or settings.config_dir / "samples"
        ids = _post_samples(base, folder, secret)
        console.print(f"posted {len(ids)} sample tickets to {base}/webhooks/generic")
        done = _watch(settings.database_url, ids, procs, timeout if exit_when_done else None)
        if exit_when_done and not done:
            fail(f"not every sample reached a terminal state within {timeout:.0f}s")
        if not exit_when_done:
            console.print("all samples triaged; still serving. Ctrl-C to stop.")
            _watch(settings.database_url, None, procs, None)
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        _stop(procs)
        if redis is not None:
            redis.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _spawn(args: list[str], env: dict[str, str], var: Path) -> subprocess.Popen[bytes]:
    var.mkdir(parents=True, exist_ok=True)
    log = (var / f"{args[0]}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "triage.cli.main", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        # Own process group: Ctrl-C reaches us once and we stop the children in order.
        start_new_session=True,
    )


def _wait_healthy(base: str, procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                fail(f"a triage process exited with {proc.returncode}; see var/*.log")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    fail(f"API did not come up on {base} within {timeout:.0f}s")


def _post_samples(base: str, folder: Path, secret: str) -> list[int]:
    from triage.ingest.signing import sign

    files = sorted(folder.glob("*.json"))
    if not files:
        fail(f"no sample tickets in {folder}")
    # A fresh suffix per run, so each `make run` triages the samples again instead of
    # answering "duplicate" for tickets an earlier run stored.
    run_id = uuid.uuid4().hex[:6]
    ids: list[int] = []
    with httpx.Client(base_url=base, timeout=10) as client:
        for path in files:
            payload: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            payload["external_id"] = f"{payload['external_id']}-{run_id}"
            body = json.dumps(payload).encode()
            msg_id, ts = f"msg_{uuid.uuid4().hex}", int(time.time())
            resp = client.post(
                "/webhooks/generic",
                content=body,
                headers={
                    "content-type": "application/json",
                    "webhook-id": msg_id,
                    "webhook-timestamp": str(ts),
                    "webhook-signature": sign(secret, msg_id, ts, body),
                },
            )
            if resp.status_code != 202:
                fail(f"{path.name}: webhook answered {resp.status_code}: {resp.text}")
            ids.append(int(resp.json()["ticket_id"]))
    return ids


def _watch(
    url: str, ids: list[int] | None, procs: list[subprocess.Popen[bytes]], timeout: float | None
) -> bool:
    """Live table of tickets until `ids` are all terminal (or forever when ids is None)."""
    from triage.db.models import TERMINAL_STATES, Classification, Ticket
    from triage.db.session import get_sessionmaker

    sessions = get_sessionmaker(url)
    terminal = {s.value for s in TERMINAL_STATES}
    deadline = None if timeout is None else time.monotonic() + timeout
    if not console.is_terminal:
        # Piped or captured output (CI logs) gets a readable width instead of 80 columns.
        console.width = max(console.width, 132)
    started = time.monotonic()
    with Live(console=console, refresh_per_second=8) as live:
        while True:
            stmt = (
                select(Ticket, Classification)
                .outerjoin(Classification, Classification.id == Ticket.current_classification_id)
                .order_by(Ticket.id.desc())
            )
            stmt = stmt.where(Ticket.id.in_(ids)) if ids is not None else stmt.limit(40)
            with sessions() as session:
                rows = session.execute(stmt).all()
            live.update(_table(rows))
            if (
                ids is not None
                and len(rows) == len(ids)
                and all(t.state in terminal for t, _ in rows)
            ):
                break
            if deadline is not None and time.monotonic() > deadline:
                return False
            if any(p.poll() is not None for p in procs):
                fail("the API or the worker stopped; see var/*.log")
            time.sleep(0.25)
    counts = Counter(t.state for t, _ in rows)
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    console.print(f"{len(rows)} tickets terminal in {time.monotonic() - started:.1f}s: {summary}")
    return True


def _table(rows: Sequence[Any]) -> Table:
    table = Table(title="triage: tickets", expand=False)
    # Every column but the subject keeps its full width; the subject absorbs a narrow screen.
    widths = {"ticket": 6, "lang": 4, "intent": 12, "department": 16, "conf": 4, "state": 13}
    for col in ("ticket", "subject", "lang", "intent", "department", "conf", "state", "latency"):
        table.add_column(
            col,
            overflow="ellipsis",
            no_wrap=True,
            min_width=widths.get(col, 8 if col == "latency" else 12),
            max_width=40 if col == "subject" else None,
        )
    styles = {"routed": "green", "needs_review": "yellow", "dead_lettered": "red"}
    for ticket, label in sorted(rows, key=lambda r: r[0].id):
        latency = "-"
        if ticket.state in styles:
            latency = (
                f"{(ticket.state_changed_at - ticket.received_at).total_seconds() * 1000:.0f} ms"
            )
        table.add_row(
            str(ticket.id),
            plain(ticket.subject or ticket.body[:40]),
            plain(label.language if label else "-"),
            label.intent if label else "-",
            ticket.department or "-",
            f"{label.confidence:.2f}" if label else "-",
            f"[{styles.get(ticket.state, 'white')}]{ticket.state}[/]",
            latency,
        )
    return table


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    # SIGTERM: Celery's warm shutdown finishes tasks in flight; uvicorn drains requests.
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
