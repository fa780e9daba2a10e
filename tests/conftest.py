"""Fixtures that start and share real services: PostgreSQL, Redis, a Celery worker process and
the fake Anthropic Messages API. Nothing here stands in for the broker or the database.

A missing service fails the run (in CI and locally alike): these tests are about the real
parts, and a silent skip would report green for work that was never checked.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import create_engine, text

from tests.support.services import (
    PG_ADMIN_URL,
    REDIS_ADMIN_URL,
    RedisDbLease,
    require_service,
)

os.environ.setdefault("TRIAGE_ENV", "test")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated to head."""
    require_service("PostgreSQL", PG_ADMIN_URL)
    name = f"triage_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    from triage.db.migrate import upgrade

    upgrade(url)
    yield url
    from triage.db.session import get_engine

    get_engine.cache_clear()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database index of our own on the machine's Redis, leased for this session so
    parallel test runs on one machine cannot consume each other's messages."""
    require_service("Redis", REDIS_ADMIN_URL)
    with RedisDbLease(REDIS_ADMIN_URL) as url:
        yield url


@pytest.fixture()
def clean_redis(redis_url: str) -> Iterator[str]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield redis_url
    client.flushdb()
    client.close()
