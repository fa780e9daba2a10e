"""Fixtures that start and share real services: PostgreSQL, Redis, a Celery worker process and
the fake Anthropic Messages API. Nothing here stands in for the broker or the database.

A missing service fails the run (in CI and locally alike): these tests are about the real
parts, and a silent skip would report green for work that was never checked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.faults.harness import FIGURES_FILE, Figures
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


def _controller(config: Any) -> bool:
    """This process reports the run: the only one, or `pytest -n`'s controller."""
    return not hasattr(config, "workerinput")


def pytest_sessionstart(session: Any) -> None:
    if _controller(session.config):
        FIGURES_FILE.unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault scenarios' figures, from the file they record to (whichever process ran
    them). Here, not in tests/faults/conftest.py: `pytest -n`'s controller never loads that."""
    if not _controller(terminalreporter.config) or not FIGURES_FILE.exists():
        return
    terminalreporter.section("fault figures")
    for figures in json.loads(FIGURES_FILE.read_text()).values():
        terminalreporter.write_line(Figures(**figures).line())
