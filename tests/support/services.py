"""Connections to the machine's services, and helpers to reach them from tests."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from types import TracebackType
from urllib.parse import urlparse

import pytest
import redis

PG_ADMIN_URL = os.environ.get(
    "TRIAGE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_ADMIN_URL = os.environ.get("TRIAGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("TRIAGE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def require_service(name: str, url: str) -> None:
    """Fail (never skip) when a service the suite needs is not listening."""
    parsed = urlparse(url.replace("+psycopg", ""))
    host, port = parsed.hostname or "127.0.0.1", parsed.port
    assert port is not None, url
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        pytest.fail(f"{name} is not reachable at {host}:{port} ({exc}); the suite needs it")


@contextlib.contextmanager
def fresh_database(prefix: str = "triage_test") -> Iterator[tuple[str, str]]:
    """A new PostgreSQL database, migrated to head, dropped afterwards: its URL and name."""
    from sqlalchemy import create_engine, text

    from triage.db.migrate import upgrade
    from triage.db.session import get_engine, get_sessionmaker

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url, name
    finally:
        get_engine.cache_clear()
        get_sessionmaker.cache_clear()
        with admin.connect() as conn:
            # A test may have closed it to connections (an outage it played out).
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def take_database_away(name: str) -> None:
    """A database outage as PostgreSQL plays it: the database stops taking connections and
    its sessions are terminated, as a failover or a restart would do to them."""
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        conn.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
            {"n": name},
        )
    admin.dispose()


def bring_database_back(name: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
    admin.dispose()


class RedisDbLease:
    """Holds one of Redis's numbered databases (1-15) for this process via a lock key in db 0."""

    TTL = 3 * 3600

    def __init__(self, admin_url: str) -> None:
        self._admin = redis.Redis.from_url(admin_url)
        self._base = admin_url.rsplit("/", 1)[0]
        self._key: str | None = None
        self.db: int | None = None

    def __enter__(self) -> str:
        for db in range(1, 16):
            key = f"triage:test-lease:{db}"
            if self._admin.set(key, str(os.getpid()), nx=True, ex=self.TTL):
                self._key, self.db = key, db
                redis.Redis.from_url(f"{self._base}/{db}").flushdb()
                return f"{self._base}/{db}"
        raise RuntimeError(
            "all Redis test databases 1-15 are leased; stale runs? delete triage:test-lease:*"
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.db is not None:
            redis.Redis.from_url(f"{self._base}/{self.db}").flushdb()
        if self._key:
            self._admin.delete(self._key)
        self._admin.close()
