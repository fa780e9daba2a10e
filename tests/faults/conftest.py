"""Fixtures for fault tests: private Redis and PostgreSQL servers (so they can be killed), the
fake Messages API, a department consumer, and the stack wired to them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from tests.fakeanthropic import FakeAnthropic
from tests.faults.harness import (
    COLLECTED,
    CONSUMER_SECRET,
    ConsumerReceiver,
    config_dir_with_consumer,
    record_file,
)
from tests.faults.servers import PostgresServer, RedisServer
from tests.support.stack import make_runtime, stack_env, truncate
from triage.db.session import get_engine, get_sessionmaker
from triage.ingest.app import create_app


@pytest.fixture(scope="package")
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(scope="package")
def private_pg() -> Iterator[PostgresServer]:
    server = PostgresServer().init().start()
    server.create_database()
    from triage.db.migrate import upgrade

    upgrade(server.url)
    yield server
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()
    server.close()


@pytest.fixture(scope="package")
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(latency=(0.05, 0.2)) as server:
        yield server


@pytest.fixture(scope="package")
def receiver() -> Iterator[ConsumerReceiver]:
    consumer = ConsumerReceiver()
    yield consumer
    consumer.close()


@pytest.fixture(scope="package")
def fault_env(
    private_redis: RedisServer,
    private_pg: PostgresServer,
    fake: FakeAnthropic,
    receiver: ConsumerReceiver,
) -> dict[str, str]:
    return stack_env(
        private_pg.url,
        private_redis.url,
        TRIAGE_BACKEND="anthropic",
        ANTHROPIC_API_KEY="sk-test",
        ANTHROPIC_BASE_URL=fake.base_url,
        TRIAGE_CONFIG_DIR=str(config_dir_with_consumer(receiver)),
        TRIAGE_SINK_SECRET_CONSUMER=CONSUMER_SECRET,
        TRIAGE_REUSE_WINDOW_HOURS="0",
        # Faults make calls wait for the client timeout; keep it short so the suite is too.
        TRIAGE_API_TIMEOUT_SECONDS="2",
        TRIAGE_STUCK_AFTER_SECONDS="15",
        # A killed worker's claims are taken over 10 s past their requests' timeouts instead
        # of 31 s (classify: 4 x 2 + 10 s); two scenarios wait for that.
        TRIAGE_CLAIM_GRACE_SECONDS="10",
        TRIAGE_SWEEP_INTERVAL_SECONDS="2",
    )


@pytest.fixture()
def stack(
    fault_env: dict[str, str],
    private_redis: RedisServer,
    private_pg: PostgresServer,
    fake: FakeAnthropic,
    receiver: ConsumerReceiver,
) -> Iterator[tuple[Any, TestClient]]:
    truncate(private_pg.url)
    redis.Redis.from_url(private_redis.url).flushall()
    fake.clear_faults()
    fake.reset_stats()
    receiver.reset()
    rt = make_runtime(fault_env)
    with TestClient(create_app(rt, relay_interval=1.0)) as client:
        yield rt, client


def pytest_sessionfinish(session: Any) -> None:
    # Again, now that every test has added its notes. The root conftest prints the file: under
    # `pytest -n` these tests run in a worker process, whose summary nobody sees.
    for figures in COLLECTED:
        record_file(figures)
