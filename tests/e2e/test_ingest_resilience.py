"""What ingestion and delivery promise when the parts around them fail: a broker that is down
while webhooks arrive loses nothing, and a sink that keeps failing dead-letters the delivery,
not the classification, and can be replayed."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tests.support.fakehttp import Reply, running_api
from tests.support.stack import (
    SINK_SECRET,
    WorkerProcess,
    config_with_webhook_sink,
    make_runtime,
    post_ticket,
    stack_env,
    ticket_payload,
    truncate,
    wait_until,
)
from triage.db.models import Classification, DeadLetter, Dispatch, OutboxMessage, Ticket
from triage.db.session import session_scope
from triage.embedded import EmbeddedRedis, free_port
from triage.ingest.app import create_app
from triage.reliability.deadletter import replay


def _states(rt, ids):
    with rt.sessions() as s:
        return dict(
            s.execute(
                select(Ticket.state, func.count()).where(Ticket.id.in_(ids)).group_by(Ticket.state)
            ).all()
        )


def test_broker_down_during_ingestion_accepts_and_classifies_once_it_is_back(pg_url, tmp_path):
    truncate(pg_url)
    broker = EmbeddedRedis(tmp_path / "redis", port=free_port())
    env = stack_env(pg_url, broker.url)
    rt = make_runtime(env)
    with TestClient(create_app(rt, relay_interval=0.5)) as client:
        # Nothing listens on the broker's port yet: every webhook must still be accepted.
        answers = [
            post_ticket(client, ticket_payload(f"outage-{i}", body="Where is my parcel?"))
            for i in range(10)
        ]
        assert [a.status_code for a in answers] == [202] * 10
        ids = [a.json()["ticket_id"] for a in answers]
        with rt.sessions() as s:
            pending = s.scalar(
                select(func.count())
                .select_from(OutboxMessage)
                .where(OutboxMessage.sent_at.is_(None))
            )
        assert pending == 10 and _states(rt, ids) == {"received": 10}

        broker.start()
        try:
            with WorkerProcess(env, concurrency=10) as worker:

                def all_terminal() -> bool:
                    return sum(
                        n
                        for state, n in _states(rt, ids).items()
                        if state in ("routed", "needs_review")
                    ) == len(ids)

                try:
                    wait_until(all_terminal, 90, what="tickets accepted during the outage")
                except AssertionError:
                    raise AssertionError(f"{_states(rt, ids)}\n{worker.log()}") from None
        finally:
            broker.stop()
    with rt.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Classification)) == 10
        assert s.scalar(select(func.count()).select_from(Dispatch)) == 10


def test_failing_sink_dead_letters_the_delivery_and_replay_delivers_it(
    pg_url, clean_redis, tmp_path
):
    truncate(pg_url)
    with running_api() as receiver:
        receiver.default = Reply(status=503, body={"error": "down for maintenance"})
        env = stack_env(
            pg_url,
            clean_redis,
            TRIAGE_CONFIG_DIR=str(config_with_webhook_sink(tmp_path, receiver.url)),
            TRIAGE_SINK_SECRET_RECEIVER=SINK_SECRET,
            TRIAGE_DELIVER_MAX_ATTEMPTS="3",
        )
        rt = make_runtime(env)
        with WorkerProcess(env, concurrency=4), TestClient(create_app(rt)) as client:
            body = "I was charged twice this month, please fix the invoice."
            tid = post_ticket(client, ticket_payload("sink-down", body=body)).json()["ticket_id"]
            wait_until(lambda: _states(rt, [tid]) == {"dead_lettered": 1}, 90, what="dead letter")
            with rt.sessions() as s:
                letter = s.scalars(select(DeadLetter).where(DeadLetter.ticket_id == tid)).one()
                labels = s.scalars(
                    select(Classification).where(Classification.ticket_id == tid)
                ).all()
                dispatch = s.scalars(select(Dispatch).where(Dispatch.ticket_id == tid)).one()
            assert letter.stage == "deliver" and "503" in letter.message
            assert len(labels) == 1 and dispatch.delivered_at is None
            posts = [r for r in receiver.requests if r.path == "/hook"]
            assert len(posts) == 3
            # Every retry carries the same idempotency key, so a receiver can deduplicate.
            assert {r.headers["webhook-id"] for r in posts} == {f"dispatch_{dispatch.id}"}

            receiver.default = Reply(status=200)
            with session_scope(rt.sessions) as session:
                replayed = replay(session, letter.id)
            assert replayed is not None and replayed.stage == "deliver"
            rt.publisher.relay_pending()

            def delivered() -> bool:
                with rt.sessions() as s:
                    return s.get(Dispatch, dispatch.id).delivered_at is not None

            wait_until(delivered, 60, what="replayed delivery")
            assert _states(rt, [tid]) == {"routed": 1}
            with rt.sessions() as s:
                n_labels = s.scalar(
                    select(func.count())
                    .select_from(Classification)
                    .where(Classification.ticket_id == tid)
                )
            assert n_labels == 1  # the replay re-ran delivery only, not the paid classification
        assert len([r for r in receiver.requests if r.path == "/hook"]) == 4
