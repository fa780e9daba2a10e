"""Helpers that build and drive a real triage stack from tests: a runtime, a worker process,
signed webhook posts, and waiting on the database for outcomes."""

from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import redis
from sqlalchemy import func, select, text

from triage.config import PROJECT_ROOT, Settings, load_config
from triage.db.session import get_engine
from triage.ingest.signing import sign
from triage.pipeline.runtime import Runtime

GENERIC_SECRET = "whsec_" + "dHJpYWdlLXRlc3Qtc2VjcmV0LWtleS0wMTIzNDU2Nzg5"
# For the webhook sink `config_with_webhook_sink` writes (TRIAGE_SINK_SECRET_RECEIVER).
SINK_SECRET = "whsec_c2luay1yZXNpbGllbmNlLXRlc3Qtc2VjcmV0LTAx"
TABLES = ("outbox", "attempts", "dead_letters", "dispatches", "classifications", "tickets")


def stack_env(database_url: str, redis_url: str, **overrides: str) -> dict[str, str]:
    """Environment for triage processes under test. Only loopback services."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRIAGE_", "ANTHROPIC_")) and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        TRIAGE_WEBHOOK_SECRET_GENERIC=GENERIC_SECRET,
        TRIAGE_BACKEND="local",
        # Short policy delays so retries happen within a test's lifetime.
        TRIAGE_CLASSIFY_BASE_DELAY="0.05",
        TRIAGE_CLASSIFY_MAX_DELAY="0.5",
        TRIAGE_DELIVER_BASE_DELAY="0.05",
        TRIAGE_DELIVER_MAX_DELAY="0.5",
        TRIAGE_SWEEP_INTERVAL_SECONDS="1",
        TRIAGE_API_TIMEOUT_SECONDS="5",
    )
    env.update(overrides)
    return env


def anthropic_env(
    database_url: str, redis_url: str, base_url: str, **overrides: str
) -> dict[str, str]:
    """`stack_env` with the Anthropic backend, talking to the fake Messages API at `base_url`."""
    return stack_env(
        database_url,
        redis_url,
        TRIAGE_BACKEND="anthropic",
        ANTHROPIC_API_KEY="sk-test",
        ANTHROPIC_BASE_URL=base_url,
        **overrides,
    )


def make_runtime(env: dict[str, str]) -> Runtime:
    """A runtime configured exactly as a process started with `env` would be."""
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        config = load_config(Settings())
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return Runtime(config)


def truncate(database_url: str) -> None:
    engine = get_engine(database_url)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
        else:
            for table in TABLES:
                conn.execute(text(f"DELETE FROM {table}"))


def empty_database(kind: str, pg_url: str, tmp_path: Path) -> str:
    """An empty database of this kind at head, for tests that run on both: the session's
    PostgreSQL truncated ("postgresql"), or a new SQLite file in `tmp_path` ("sqlite")."""
    if kind == "postgresql":
        truncate(pg_url)
        return pg_url
    from triage.db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'triage.db'}"
    upgrade(url)
    return url


class WorkerProcess:
    """`triage worker` as a real subprocess, its output kept in a log file for failures.

    Every started worker is also killed at interpreter exit, so a test that fails between
    start and stop cannot leave a worker consuming from a later test's queues."""

    _started: ClassVar[list[subprocess.Popen[bytes]]] = []

    def __init__(self, env: dict[str, str], *, concurrency: int = 50, queues: str = "") -> None:
        self.env = env
        self.concurrency = concurrency
        self.queues = queues
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="triage-worker-", suffix=".log")[1])

    def start(self, timeout: float = 60) -> WorkerProcess:
        args = [sys.executable, "-m", "triage.cli.main", "worker", "-c", str(self.concurrency)]
        if self.queues:
            args += ["-Q", self.queues]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT
        )
        WorkerProcess._started.append(self.proc)
        try:
            wait_until(
                lambda: b" ready." in self.log_path.read_bytes() or self.proc.poll() is not None,  # type: ignore[union-attr]
                timeout,
                what="worker ready",
            )
        except AssertionError:
            self.kill9()
            raise AssertionError(f"worker not ready after {timeout}s:\n{self.log()}") from None
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited {self.proc.returncode}:\n{self.log()}")
        return self

    def log(self) -> str:
        """The log's last 6,000 characters, to show with a failure."""
        return self.log_path.read_text(errors="replace")[-6000:]

    def full_log(self) -> str:
        """The whole log, for assertions on what it says: on a slow machine retries and their
        tracebacks push earlier lines out of `log()`'s tail."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@atexit.register
def _kill_leftover_workers() -> None:
    for proc in WorkerProcess._started:
        if proc.poll() is None:
            proc.kill()


def count_rows(rt: Runtime, model: Any) -> int:
    with rt.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def in_background(work: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run `work` on a thread of its own, as a worker's task thread would; its result lands
    in the dict under "result" once the thread is joined."""
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", work()))
    thread.start()
    return thread, out


def wait_until(
    predicate: Callable[[], Any], timeout: float, *, what: str = "condition", every: float = 0.1
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def ticket_payload(
    external_id: str | None = None,
    *,
    subject: str = "Help",
    body: str = "My order is late.",
    **extra: Any,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "external_id": external_id or f"t-{uuid.uuid4().hex[:12]}",
        "subject": subject,
        "body": body,
        "requester": {"email": "jane.doe@example.com", "name": "Jane Doe"},
        "channel": "email",
        "created_at": "2026-11-24T10:00:00Z",
        "metadata": {},
    }
    payload.update(extra)
    return payload


def signed_headers(
    body: bytes, secret: str = GENERIC_SECRET, *, ts: int | None = None
) -> dict[str, str]:
    msg_id = f"msg_{uuid.uuid4().hex}"
    timestamp = int(time.time()) if ts is None else ts
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


def post_ticket(client: Any, payload: dict[str, Any], secret: str = GENERIC_SECRET) -> Any:
    body = json.dumps(payload).encode()
    return client.post("/webhooks/generic", content=body, headers=signed_headers(body, secret))


class Counter:
    """A thread-safe counter for tests that count events from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.value += n


def queued_ids(redis_url: str, queue: str) -> list[int]:
    """The ids carried by the task messages waiting on a Redis queue (one per message, or a
    batch's list), read without consuming them."""
    ids: list[int] = []
    for raw in redis.Redis.from_url(redis_url).lrange(queue, 0, -1):
        envelope = json.loads(raw)
        _args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        for name, value in kwargs.items():
            if name.endswith("_ids"):
                ids += value
            elif name.endswith("_id"):
                ids.append(value)
    return ids


def config_with_sinks(tmp_path: Path, sinks_yaml: str) -> Path:
    """config/ as shipped (less the samples), with `sinks_yaml` as its sinks.yaml."""
    config = tmp_path / "config"
    shutil.copytree(PROJECT_ROOT / "config", config, ignore=shutil.ignore_patterns("samples"))
    (config / "sinks.yaml").write_text(sinks_yaml)
    return config


def config_with_webhook_sink(
    tmp_path: Path, url: str, *, timeout_seconds: float | None = None
) -> Path:
    """config/ as shipped, with every department delivered to a webhook receiver at `url`
    (`{url}/hook`), its requests' timeout `timeout_seconds` (None: the default)."""
    timeout = "" if timeout_seconds is None else f"timeout_seconds: {timeout_seconds}\n"
    return config_with_sinks(
        tmp_path,
        timeout + "webhooks:\n"
        "  receiver:\n"
        f"    url: {url}/hook\n"
        "    secret_env: TRIAGE_SINK_SECRET_RECEIVER\n"
        "default: [webhook:receiver]\n",
    )


@dataclass
class ServedApi:
    """`triage serve` as a real subprocess: its URL, and its output once it has stopped."""

    url: str
    output: str = ""


@contextmanager
def served_api(env: dict[str, str], *, workers: int = 1) -> Iterator[ServedApi]:
    """`triage serve --workers N` on a free port, up and answering /healthz; stopped with
    SIGTERM on the way out, its output kept for the test's assertions."""
    import httpx

    from triage.embedded import free_port

    port = free_port()
    args = [sys.executable, "-m", "triage.cli.main", "serve", "--workers", str(workers)]
    proc = subprocess.Popen(
        [*args, "--port", str(port)],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    served = ServedApi(f"http://127.0.0.1:{port}")

    def up() -> bool:
        try:
            return httpx.get(f"{served.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None

    try:
        wait_until(up, 60, what="triage serve up")
        yield served
    finally:
        proc.send_signal(signal.SIGTERM)
        served.output = proc.communicate(timeout=30)[0].decode(errors="replace")


def routed_dispatch(
    rt: Runtime, *, source: str, external_id: str, subject: str = "Refund", body: str
) -> tuple[int, int]:
    """A ticket accepted and classified in-process, its delivery not yet made: the ticket's id
    and its dispatch's."""
    from triage.db.models import Dispatch
    from triage.db.repo import accept_ticket
    from triage.db.session import session_scope
    from triage.ingest.models import InboundTicket
    from triage.pipeline.classify_stage import classify_tickets_stage

    inbound = InboundTicket(source=source, external_id=external_id, subject=subject, body=body)
    with session_scope(rt.sessions) as session:
        tid = accept_ticket(session, inbound).ticket_id
    assert tid is not None
    assert classify_tickets_stage(rt, [tid])[tid] in ("routed", "review")
    with rt.sessions() as session:
        (dispatch_id,) = session.scalars(select(Dispatch.id).where(Dispatch.ticket_id == tid))
    return tid, int(dispatch_id)
