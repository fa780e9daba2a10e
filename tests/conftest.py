"""Fixtures that start and share real services: PostgreSQL, Redis, a Celery worker process and
the fake Anthropic Messages API. Nothing here stands in for the broker or the database.

A missing service fails the run (in CI and locally alike): these tests are about the real
parts, and a silent skip would report green for work that was never checked.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.support.services import (
    PG_ADMIN_URL,
    REDIS_ADMIN_URL,
    RedisDbLease,
    fresh_database,
    require_service,
)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated to head."""
    require_service("PostgreSQL", PG_ADMIN_URL)
    with fresh_database() as (url, _name):
        yield url


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
