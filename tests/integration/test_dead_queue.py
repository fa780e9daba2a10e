"""triage.dead is kept to TRIAGE_DEAD_QUEUE_MAX_LENGTH on the real Redis: nobody may consume
it, and without a bound it would grow for ever. The dead letters stay in the database."""

from __future__ import annotations

import base64
import json

import redis
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from tests.support.stack import make_runtime, stack_env, truncate
from triage.db.models import DeadLetter, Ticket
from triage.db.session import session_scope
from triage.errors import PermanentError
from triage.pipeline.broker import trim_queue
from triage.pipeline.routing import DEAD_QUEUE
from triage.reliability.deadletter import dead_letter
from triage.reliability.sweeper import sweep_once


def _dead_letters(rt, n):
    """n tickets dead-lettered through the real path, their notices published in order."""
    for i in range(n):
        with session_scope(rt.sessions) as s:
            ticket = Ticket(
                source="generic",
                external_id=f"dead-{i}",
                subject="s",
                body="b",
                clean_text="b",
                content_hash=f"dead-{i}",
                state="classifying",
            )
            s.add(ticket)
            s.flush()
            recorded = dead_letter(
                s,
                ticket_id=ticket.id,
                stage="classify",
                error=PermanentError(f"poison {i}"),
                attempts=1,
                payload={},
            )
            assert recorded is not None
            notice = recorded[1]
        rt.publisher.publish([notice])


def _waiting_letter_ids(redis_url):
    client = redis.Redis.from_url(redis_url)
    raw = client.lrange(DEAD_QUEUE, 0, -1)
    client.close()
    ids = []
    for message in raw:
        envelope = json.loads(message)
        _args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        ids.append(kwargs["dead_letter_id"])
    return ids


def _dropped():
    return REGISTRY.get_sample_value("triage_dead_notices_dropped_total") or 0.0


def test_the_sweeper_keeps_the_newest_notices_and_every_dead_letter(pg_url, clean_redis):
    truncate(pg_url)
    rt = make_runtime(stack_env(pg_url, clean_redis, TRIAGE_DEAD_QUEUE_MAX_LENGTH="5"))
    _dead_letters(rt, 12)
    assert len(_waiting_letter_ids(clean_redis)) == 12
    before = _dropped()

    report = sweep_once(rt)

    assert report.dropped_dead_notices == 7
    assert _dropped() - before == 7
    with rt.sessions() as s:
        letters = s.scalars(select(DeadLetter.id).order_by(DeadLetter.id)).all()
    assert len(letters) == 12
    # The newest five are left, newest first (kombu pushes left, consumers pop right).
    assert _waiting_letter_ids(clean_redis) == letters[-5:][::-1]
    # Within the bound: nothing more to drop.
    assert sweep_once(rt).dropped_dead_notices == 0
    assert len(_waiting_letter_ids(clean_redis)) == 5


def test_no_limit_keeps_every_notice(pg_url, clean_redis):
    truncate(pg_url)
    rt = make_runtime(stack_env(pg_url, clean_redis, TRIAGE_DEAD_QUEUE_MAX_LENGTH="0"))
    _dead_letters(rt, 4)
    assert sweep_once(rt).dropped_dead_notices == 0
    assert len(_waiting_letter_ids(clean_redis)) == 4
    with rt.sessions() as s:
        assert s.scalar(select(func.count()).select_from(DeadLetter)) == 4


def test_an_unreachable_broker_trims_nothing(pg_url):
    rt = make_runtime(stack_env(pg_url, "redis://127.0.0.1:1/0"))
    assert trim_queue(rt.celery, DEAD_QUEUE, 5) is None
