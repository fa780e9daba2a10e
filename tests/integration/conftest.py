"""Fixtures for the integration tests that run the stages in-process: the fake Messages API
and a runtime factory on the real PostgreSQL (emptied first) and Redis (a test module that
needs other settings by default overrides `runtime` and asks for this one), and the local HTTP
servers the sink tests write to."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.fakeanthropic import FakeAnthropic
from tests.support.fakehttp import FakeApi, FakeZendesk, running_api
from tests.support.stack import anthropic_env, make_runtime, truncate
from triage.pipeline.runtime import Runtime


@pytest.fixture()
def fake() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as api:
        yield api


@pytest.fixture()
def runtime(pg_url: str, clean_redis: str, fake: FakeAnthropic) -> Callable[..., Runtime]:
    """`runtime(**settings)`: a Runtime with these `TRIAGE_*` settings on top of the test
    environment's, calling the fake API."""
    truncate(pg_url)

    def build(**overrides: str) -> Runtime:
        return make_runtime(anthropic_env(pg_url, clean_redis, fake.base_url, **overrides))

    return build


@pytest.fixture()
def api() -> Iterator[FakeApi]:
    """A local HTTP server answering what each test scripts (a helpdesk, a webhook receiver)."""
    with running_api() as fake:
        yield fake


@pytest.fixture()
def zd() -> FakeZendesk:
    """Zendesk's tickets, kept as Zendesk keeps them: ticket 101 carries an agent's tag."""
    helpdesk = FakeZendesk()
    helpdesk.ticket(101, tags=["vip"])
    return helpdesk


@pytest.fixture()
def zd_api(zd: FakeZendesk) -> Iterator[FakeApi]:
    with running_api(zd) as fake:
        yield fake
