"""Fixtures for the integration tests that run the stages in-process: the fake Messages API
and a runtime factory on the real PostgreSQL (emptied first) and Redis. A test module that
needs other settings by default overrides `runtime` and asks for this one."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.fakeanthropic import FakeAnthropic
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
