"""Fixtures for the admin CLI: the real PostgreSQL and Redis, the fake Messages API, and a
CliRunner that runs `triage` with exactly the environment a shell would give it."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from tests.fakeanthropic import FakeAnthropic
from tests.support.rows import add_label, add_ticket
from tests.support.stack import make_runtime, stack_env
from triage.cli.main import app
from triage.db.session import get_engine, session_scope
from triage.pipeline.runtime import Runtime

TABLES = (
    "reprocess_items",
    "message_batches",
    "reprocess_runs",
    "outbox",
    "attempts",
    "dead_letters",
    "dispatches",
    "classifications",
    "tickets",
)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(batch_delay=0.2) as server:
        yield server


@pytest.fixture()
def db(pg_url: str) -> str:
    engine = get_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    return pg_url


@pytest.fixture()
def env(db: str, clean_redis: str, fake: FakeAnthropic) -> dict[str, str]:
    fake.clear_faults()
    fake.reset_stats()
    return stack_env(
        db,
        clean_redis,
        TRIAGE_BACKEND="anthropic",
        ANTHROPIC_API_KEY="sk-test",
        ANTHROPIC_BASE_URL=fake.base_url,
        TRIAGE_ESCALATION_MODEL="",
    )


@pytest.fixture()
def rt(env: dict[str, str]) -> Runtime:
    return make_runtime(env)


class Cli:
    def __init__(self, env: dict[str, str]) -> None:
        # Unset whatever the developer's shell has, so only `env` configures the command.
        self.env: dict[str, str | None] = {
            k: None
            for k in os.environ
            if k.startswith(("TRIAGE_", "ANTHROPIC_")) or k in ("DATABASE_URL", "REDIS_URL")
        }
        self.env.update(env)
        self.runner = CliRunner()

    def __call__(
        self, *args: str, code: int | None = 0, input: str | None = None, **env: str
    ) -> Any:
        result = self.runner.invoke(app, list(args), env={**self.env, **env}, input=input)
        if code is not None:
            assert result.exit_code == code, (
                f"exit {result.exit_code}, wanted {code}\n{result.output}\n{result.exception!r}"
            )
        return result

    def json(self, *args: str, **env: str) -> Any:
        result = self(*args, "--json", **env)
        return json.loads(result.stdout)


@pytest.fixture()
def ctrl_c() -> Iterator[Callable[[], None]]:
    """Press Ctrl-C on this process. Python's own SIGINT handler is put in place first: a
    process started in the background by a non-interactive shell inherits SIGINT ignored, and
    then the interrupt would never arrive."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield lambda: os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture()
def cli(env: dict[str, str]) -> Cli:
    return Cli(env)


def seed_routed(
    rt: Runtime,
    bodies: list[str],
    *,
    intent: str = "other",
    department: str = "general",
    model: str = "claude-haiku-4-5",
    confidence: float = 0.9,
) -> list[int]:
    """Tickets already triaged in the past: routed, with one label each (the history that
    reprocessing must keep)."""
    ids = []
    with session_scope(rt.sessions) as session:
        for body in bodies:
            ticket = add_ticket(session, body, department=department)
            add_label(session, ticket, intent=intent, model=model, confidence=confidence)
            ids.append(ticket.id)
    return ids
