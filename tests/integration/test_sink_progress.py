"""A department's sinks run one after another in one delivery. When a later sink fails, the
earlier ones have already accepted the dispatch: the failed attempt records them, and the
retry (or the replay of a dead letter) skips them. Before, every later attempt ran every
sink again, so a webhook receiver was sent the dispatch twice and a helpdesk write-back made
its reads again.

Real PostgreSQL and Redis, a real HTTP server standing in for Zendesk and the webhook
receivers; the stages run in-process as a worker's task threads run them, and, for the dead
letter, a real worker and `triage dlq replay`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY
from sqlalchemy import delete, event, select, update
from typer.testing import CliRunner

from tests.integration.test_sinks import WEBHOOK_SECRET
from tests.support.fakehttp import FakeApi, FakeZendesk, Reply, running_api
from tests.support.stack import (
    WorkerProcess,
    config_with_sinks,
    make_runtime,
    routed_dispatch,
    stack_env,
    truncate,
    wait_until,
)
from triage.cli.main import app
from triage.db.models import Dispatch, OutboxMessage, Ticket, utcnow
from triage.db.repo import accept_ticket
from triage.db.session import session_scope
from triage.ingest.models import InboundTicket
from triage.pipeline.classify_stage import classify_tickets_stage
from triage.pipeline.deliver_stage import deliver_many_stage
from triage.pipeline.relay import DELIVER_TASK
from triage.pipeline.runtime import Runtime
from triage.reliability.sweeper import sweep_once

ZD_COMMENTS = "/api/v2/tickets/101/comments.json?sort_order=desc&per_page=100"
ZD_UPDATE = ("PUT", "/api/v2/tickets/101.json")
SECRETS = {"TRIAGE_TEST_ZD_TOKEN": "zd-token", "TRIAGE_TEST_HOOK_SECRET": WEBHOOK_SECRET}


@pytest.fixture()
def zendesk() -> Iterator[tuple[FakeZendesk, FakeApi]]:
    """Zendesk's ticket 101, and the webhook receivers (/crm, /audit) on the same server."""
    helpdesk = FakeZendesk()
    helpdesk.ticket(101, tags=["vip"])
    with running_api(helpdesk) as api:
        yield helpdesk, api


@pytest.fixture()
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    # The sink table is read when first used, from this process's environment.
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


def _env(pg_url: str, redis_url: str, tmp_path: Path, api: FakeApi, sinks: str) -> dict[str, str]:
    """Every department delivered to `sinks`, in that order."""
    config = config_with_sinks(
        tmp_path,
        "timeout_seconds: 2\n"
        "helpdesks:\n"
        f"  zendesk: {{base_url: '{api.url}', email: bot@acme.test,"
        " api_token_env: TRIAGE_TEST_ZD_TOKEN}\n"
        "webhooks:\n"
        f"  crm: {{url: '{api.url}/crm', secret_env: TRIAGE_TEST_HOOK_SECRET}}\n"
        f"  audit: {{url: '{api.url}/audit', secret_env: TRIAGE_TEST_HOOK_SECRET}}\n"
        f"default: [{sinks}]\n",
    )
    return stack_env(pg_url, redis_url, TRIAGE_CONFIG_DIR=str(config), **SECRETS)


def _routed(rt: Runtime) -> tuple[int, int]:
    """Zendesk ticket 101 accepted and classified: its id and its dispatch's, not delivered."""
    return routed_dispatch(rt, source="zendesk", external_id="101", body="I was charged twice")


def _posts(api: FakeApi, path: str, dispatch_id: int) -> int:
    """The webhook requests for this dispatch that reached `path`."""
    return sum(
        1
        for r in api.requests
        if (r.method, r.path) == ("POST", path)
        and r.headers["webhook-id"] == f"dispatch_{dispatch_id}"
    )


def _retry_message(rt: Runtime, tid: int) -> OutboxMessage:
    with rt.sessions() as session:
        *_first, retry = session.scalars(
            select(OutboxMessage)
            .where(OutboxMessage.ticket_id == tid, OutboxMessage.task == DELIVER_TASK)
            .order_by(OutboxMessage.id)
        ).all()
    return retry


def _dispatch(rt: Runtime, dispatch_id: int) -> Dispatch:
    with rt.sessions() as session:
        dispatch = session.get(Dispatch, dispatch_id)
        assert dispatch is not None
        return dispatch


def _already_done(sink: str) -> float:
    labels = {"sink": sink, "reason": "already_done"}
    return REGISTRY.get_sample_value("triage_sink_skipped_total", labels) or 0.0


def test_a_retry_after_the_second_webhook_failed_does_not_send_the_first_one_again(
    pg_url, clean_redis, tmp_path, zendesk, secrets, caplog
):
    truncate(pg_url)
    _zd, api = zendesk
    rt = make_runtime(_env(pg_url, clean_redis, tmp_path, api, "webhook:crm, webhook:audit"))
    tid, dispatch_id = _routed(rt)
    api.script("POST", "/audit", Reply(status=503))
    skipped_before = _already_done("webhook:crm")

    assert deliver_many_stage(rt, [dispatch_id]) == {dispatch_id: "retry"}
    retry = _retry_message(rt, tid)
    with caplog.at_level(logging.INFO, logger="triage.pipeline.deliver_stage"):
        outcome = deliver_many_stage(rt, [retry.args["dispatch_id"]])

    assert outcome == {dispatch_id: "delivered"}
    # The receiver that accepted the first attempt got the dispatch once; the one that
    # answered 503 got it again and took it.
    assert (_posts(api, "/crm", dispatch_id), _posts(api, "/audit", dispatch_id)) == (1, 2)
    dispatch = _dispatch(rt, dispatch_id)
    assert dispatch.delivered_at is not None and dispatch.sinks_done == ["webhook:crm"]
    assert f"dispatch {dispatch_id} of ticket {tid} (attempt 2): webhook:crm skipped" in caplog.text
    assert _already_done("webhook:crm") == skipped_before + 1


def test_a_retry_after_the_webhook_failed_does_not_write_back_to_zendesk_again(
    pg_url, clean_redis, tmp_path, zendesk, secrets
):
    zd, api = zendesk
    truncate(pg_url)
    rt = make_runtime(_env(pg_url, clean_redis, tmp_path, api, "helpdesk, webhook:crm"))
    tid, dispatch_id = _routed(rt)
    # A timeout, as a slow receiver gives it (the sinks' timeout is 2 s).
    api.script("POST", "/crm", Reply(delay=3))

    assert deliver_many_stage(rt, [dispatch_id]) == {dispatch_id: "retry"}
    written = api.calls().count(ZD_UPDATE)
    retry = _retry_message(rt, tid)
    assert deliver_many_stage(rt, [retry.args["dispatch_id"]]) == {dispatch_id: "delivered"}

    # One write-back: its comment read and its update made once, not read again on the retry.
    assert (api.calls().count(("GET", ZD_COMMENTS)), api.calls().count(ZD_UPDATE)) == (1, 1)
    assert written == 1 and len(zd.tickets[101].comments) == 1
    assert _posts(api, "/crm", dispatch_id) == 2
    assert _dispatch(rt, dispatch_id).sinks_done == ["helpdesk"]


def test_a_dead_letter_replayed_after_a_zendesk_403_does_not_send_the_webhook_again(
    pg_url, clean_redis, tmp_path, zendesk, secrets
):
    # The webhook takes the dispatch, then Zendesk refuses the token (403): dead-lettered at
    # `deliver`. The operator fixes the token's scope and replays the letter; a real worker
    # delivers both times.
    zd, api = zendesk
    truncate(pg_url)
    env = _env(pg_url, clean_redis, tmp_path, api, "webhook:crm, helpdesk")
    rt = make_runtime(env)
    api.script("GET", ZD_COMMENTS, Reply(status=403, body={"error": "Forbidden"}))
    tid, dispatch_id = _routed(rt)

    def state() -> str:
        with rt.sessions() as session:
            ticket = session.get(Ticket, tid)
            assert ticket is not None
            return ticket.state

    cli = CliRunner()
    with WorkerProcess(env, concurrency=4) as worker:
        wait_until(lambda: state() == "dead_lettered", 60, what="ticket dead-lettered")
        assert _posts(api, "/crm", dispatch_id) == 1

        listed = cli.invoke(app, ["dlq", "list", "--json"], env=env)
        (letter,) = json.loads(listed.stdout)
        assert (letter["ticket_id"], letter["stage"]) == (tid, "deliver")
        replayed = cli.invoke(app, ["dlq", "replay", str(letter["id"]), "--json"], env=env)
        assert replayed.exit_code == 0, replayed.output
        wait_until(lambda: _dispatch(rt, dispatch_id).delivered_at, 60, what="delivered")
        log = worker.full_log()

    assert state() in ("routed", "needs_review")
    assert _posts(api, "/crm", dispatch_id) == 1
    assert len(zd.tickets[101].comments) == 1
    assert _dispatch(rt, dispatch_id).sinks_done == ["webhook:crm"]
    assert f"dispatch {dispatch_id} of ticket {tid} (attempt 1): webhook:crm skipped" in log
    shown = cli.invoke(app, ["tickets", "show", str(tid)], env=env).stdout
    # The timeline's last column wraps at the console's width (80 under xdist, whatever
    # COLUMNS says): its continuation rows, read across the blank columns, give the line back.
    flat = " ".join(shown.replace("\u2502", " ").split())
    assert "sinks done (not sent again): webhook:crm" in flat, shown
    timeline = json.loads(cli.invoke(app, ["tickets", "show", str(tid), "--json"], env=env).stdout)
    (dispatched,) = [e["detail"] for e in timeline["timeline"] if e["event"] == "dispatch"]
    assert dispatched["sinks_done"] == ["webhook:crm"]
    # The ticket's view too, as GET /tickets/{id} gives it.
    assert [d["sinks_done"] for d in timeline["dispatches"]] == [["webhook:crm"]]


def test_a_delivery_every_sink_accepts_writes_no_progress(
    pg_url, clean_redis, tmp_path, zendesk, secrets
):
    # The path nearly every ticket takes: the same statements as before there was progress
    # to keep, and the column left empty.
    _zd, api = zendesk
    truncate(pg_url)
    rt = make_runtime(_env(pg_url, clean_redis, tmp_path, api, "webhook:crm, webhook:audit"))
    _tid, dispatch_id = _routed(rt)
    statements: list[str] = []
    engine = rt.sessions.kw["bind"]

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        assert deliver_many_stage(rt, [dispatch_id]) == {dispatch_id: "delivered"}
    finally:
        event.remove(engine, "before_cursor_execute", seen)

    # As before there was progress to keep: taking the dispatch, its ticket, the leases, the
    # marker, the label; then the dispatch delivered, its attempt ok, lost ones said so.
    assert [_shape(s) for s in statements] == [
        "UPDATE dispatches",
        "SELECT tickets",
        "SELECT attempts",
        "INSERT attempts",
        "SELECT classifications",
        "UPDATE dispatches SET delivered_at",
        "UPDATE attempts",
        "UPDATE attempts",
    ]
    assert _dispatch(rt, dispatch_id).sinks_done is None


def _shape(statement: str) -> str:
    """A statement as its kind and table (and for an update of dispatches, what it sets)."""
    words = statement.split()
    if words[0] == "SELECT":
        return f"SELECT {words[words.index('FROM') + 1]}"
    if words[0] == "INSERT":
        return f"INSERT {words[2]}"
    if words[:2] == ["UPDATE", "dispatches"] and not words[3].startswith("delivery_attempts"):
        return f"UPDATE dispatches SET {words[3].split('=')[0]}"
    return " ".join(words[:2])


def test_a_sink_recorded_as_done_that_the_config_no_longer_has_blocks_nothing(
    pg_url, clean_redis, tmp_path, zendesk, secrets
):
    _zd, api = zendesk
    truncate(pg_url)
    rt = make_runtime(_env(pg_url, clean_redis, tmp_path, api, "webhook:crm, webhook:audit"))
    _tid, dispatch_id = _routed(rt)
    with session_scope(rt.sessions) as session:
        session.execute(
            update(Dispatch)
            .where(Dispatch.id == dispatch_id)
            .values(sinks_done=["webhook:retired", "webhook:audit"])
        )

    assert deliver_many_stage(rt, [dispatch_id]) == {dispatch_id: "delivered"}
    assert (_posts(api, "/crm", dispatch_id), _posts(api, "/audit", dispatch_id)) == (1, 0)


def test_a_ticket_routed_anew_after_a_partial_delivery_starts_with_every_sink_to_run(
    pg_url, clean_redis, tmp_path, zendesk, secrets
):
    # The progress belongs to the dispatch: new customer text makes a new generation and a
    # new dispatch, whose webhook (a new webhook-id) every receiver is to get.
    _zd, api = zendesk
    truncate(pg_url)
    env = _env(pg_url, clean_redis, tmp_path, api, "webhook:crm, webhook:audit")
    rt = make_runtime({**env, "TRIAGE_UPDATE_POLICY": "retriage"})

    def post(**update: str) -> int:
        inbound = InboundTicket(
            source="generic",
            external_id="again-1",
            subject="Refund",
            body="Charged twice",
            **update,
        )
        with session_scope(rt.sessions) as session:
            return accept_ticket(session, inbound, update_policy="retriage").ticket_id

    tid = post()
    assert classify_tickets_stage(rt, [tid])[tid] in ("routed", "review")
    with rt.sessions() as session:
        (old,) = session.scalars(select(Dispatch.id).where(Dispatch.ticket_id == tid))
    api.script("POST", "/audit", Reply(status=503))
    assert deliver_many_stage(rt, [old]) == {old: "retry"}
    assert _dispatch(rt, old).sinks_done == ["webhook:crm"]

    post(update_key="c1", update_text="And the app crashes when I open the invoice.")
    assert classify_tickets_stage(rt, [tid])[tid] in ("routed", "review")
    with rt.sessions() as session:
        (new,) = session.scalars(
            select(Dispatch.id).where(Dispatch.ticket_id == tid, Dispatch.generation == 1)
        )
    # The old routing's retry changes nothing; the new one goes to both receivers.
    assert deliver_many_stage(rt, [old]) == {old: "superseded"}
    assert deliver_many_stage(rt, [new]) == {new: "delivered"}
    assert (_posts(api, "/crm", new), _posts(api, "/audit", new)) == (1, 1)
    assert (_posts(api, "/crm", old), _posts(api, "/audit", old)) == (1, 1)
    assert _dispatch(rt, new).sinks_done is None


def test_the_sweepers_resend_of_a_lost_retry_skips_the_sinks_done_too(
    pg_url, clean_redis, tmp_path, zendesk, secrets
):
    # The retry's message is lost with the broker's data: the sweeper finds the dispatch
    # undelivered and sends it again, and that attempt too skips what the first got through.
    _zd, api = zendesk
    truncate(pg_url)
    rt = make_runtime(_env(pg_url, clean_redis, tmp_path, api, "webhook:crm, webhook:audit"))
    tid, dispatch_id = _routed(rt)
    api.script("POST", "/audit", Reply(status=503))
    assert deliver_many_stage(rt, [dispatch_id]) == {dispatch_id: "retry"}
    redis.Redis.from_url(clean_redis).flushdb()
    long_ago = utcnow() - timedelta(hours=1)
    with session_scope(rt.sessions) as session:
        session.execute(delete(OutboxMessage).where(OutboxMessage.task == DELIVER_TASK))
        session.execute(update(Dispatch).values(created_at=long_ago))

    assert sweep_once(rt, stuck_after=60).requeued_deliveries == 1
    resent = _retry_message(rt, tid)
    assert deliver_many_stage(rt, [resent.args["dispatch_id"]]) == {dispatch_id: "delivered"}
    assert (_posts(api, "/crm", dispatch_id), _posts(api, "/audit", dispatch_id)) == (1, 2)
