"""The broker connection a REDIS_URL / TRIAGE_BROKER_URL makes. No broker is contacted."""

from __future__ import annotations

import ssl

import pytest

from triage.config import Settings, load_config
from triage.pipeline.celery_app import make_celery
from triage.pipeline.redis_transport import Transport


def connection(url: str):
    app = make_celery(load_config(Settings(backend="local", redis_url=url)))
    return app.connection_for_write()


def test_a_rediss_url_verifies_the_servers_certificate():
    # kombu alone would connect with CERT_NONE: encrypted, but to any server that answers.
    conn = connection("rediss://:s3cret@redis.example:6380/0")

    assert conn.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def test_a_rediss_url_may_opt_out_of_verification_in_its_query():
    conn = connection("rediss://redis.example:6380/0?ssl_cert_reqs=none")

    assert conn.ssl == {"ssl_cert_reqs": ssl.CERT_NONE}


@pytest.mark.parametrize("url", ["redis://redis.example:6379/0", "rediss://redis.example:6380/0"])
def test_redis_over_tls_or_not_uses_triages_transport(url):
    # Its reconnect fix keeps a worker alive when Redis restarts; TLS connections drop too.
    assert isinstance(connection(url).transport, Transport)


def test_a_plain_redis_url_has_no_tls():
    assert not connection("redis://:pw@redis.example:6379/0").ssl
