"""End to end: a Zendesk webhook reports the ticket's group and priority, triage classifies
it, an agent moves the ticket before the write-back runs (a backlog, an outage), and the
write-back leaves the agent's group while still adding triage's tags and private comment.
Real PostgreSQL and Redis, the API in-process, the stages run as a worker's tasks run them,
and a fake Zendesk keeping the ticket's state."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.integration.test_sources import (
    FRESHDESK,
    ZENDESK,
    freshdesk_ticket,
    source_env,
    zendesk_ticket,
)
from tests.support.fakehttp import FakeApi, FakeZendesk, running_api
from tests.support.stack import config_with_sinks, make_runtime, truncate
from triage.db.models import Attempt, Dispatch, OutboxMessage, Ticket
from triage.ingest.app import create_app
from triage.pipeline.classify_stage import classify_tickets_stage
from triage.pipeline.deliver_stage import deliver_many_stage
from triage.pipeline.relay import DELIVER_TASK
from triage.pipeline.runtime import Runtime

AGENTS_GROUP = 360777
# Every department of the shipped taxonomy has a group: whichever the ticket is routed to.
DEPARTMENTS = ["accounts", "billing", "customer_success", "escalations"]
DEPARTMENTS += ["general", "logistics", "sales", "tech_support"]
GROUPS = {department: 360001 + i for i, department in enumerate(DEPARTMENTS)}


@pytest.fixture()
def helpdesk() -> Iterator[tuple[FakeZendesk, FakeApi]]:
    zendesk = FakeZendesk()
    # As the webhook will report it.
    zendesk.ticket(101, tags=["billing", "vip"], group_id=360009, priority="normal")
    with running_api(zendesk) as api:
        yield zendesk, api


@pytest.fixture()
def rt(pg_url, clean_redis, tmp_path, helpdesk, monkeypatch) -> Runtime:
    truncate(pg_url)
    _zendesk, api = helpdesk
    groups = "".join(f"      {dept}: {group}\n" for dept, group in GROUPS.items())
    config = config_with_sinks(
        tmp_path,
        "timeout_seconds: 2\n"
        "helpdesks:\n"
        "  zendesk:\n"
        f"    base_url: '{api.url}'\n"
        "    email: bot@acme.test\n"
        "    api_token_env: TRIAGE_TEST_ZD_TOKEN\n"
        f"    groups:\n{groups}"
        "default: [helpdesk]\n",
    )
    # The sink table is read when first used, from this process's environment.
    monkeypatch.setenv("TRIAGE_TEST_ZD_TOKEN", "zd-token")
    return make_runtime(
        source_env(
            pg_url, clean_redis, TRIAGE_CONFIG_DIR=str(config), TRIAGE_UPDATE_POLICY="retriage"
        )
    )


def _route(rt: Runtime, ticket_id: int) -> int:
    """Classify the ticket and return its newest dispatch, not yet delivered."""
    assert classify_tickets_stage(rt, [ticket_id])[ticket_id] in ("routed", "review")
    with rt.sessions() as session:
        return session.scalars(
            select(Dispatch.id).where(Dispatch.ticket_id == ticket_id).order_by(Dispatch.id.desc())
        ).first()


def _department(rt: Runtime, ticket_id: int) -> str:
    with rt.sessions() as session:
        ticket = session.get(Ticket, ticket_id)
        assert ticket is not None and ticket.department in GROUPS
        return ticket.department


def test_an_agents_group_change_before_the_write_back_survives_it_and_the_note_says_so(
    rt, helpdesk
):
    zendesk, _api = helpdesk
    with TestClient(create_app(rt, relay_interval=3600)) as client:
        sent = zendesk_ticket(101, group_id="360009", priority="Normal")
        ticket_id = ZENDESK.post(client, sent).json()["ticket_id"]
    dispatch_id = _route(rt, ticket_id)
    department = _department(rt, ticket_id)

    # An agent moves the ticket while the delivery waits.
    zendesk.tickets[101].group_id = AGENTS_GROUP
    assert deliver_many_stage(rt, [dispatch_id]) == {dispatch_id: "delivered"}

    ticket = zendesk.tickets[101]
    assert ticket.group_id == AGENTS_GROUP
    assert f"triage_{department}" in ticket.tags and {"billing", "vip"} <= set(ticket.tags)
    (comment,) = ticket.comments
    assert comment["public"] is False
    assert comment["body"].startswith(f"[triage] dispatch {dispatch_id}: routed to ")
    assert comment["body"].endswith("\ngroup left as an agent set it")


def test_an_agents_group_change_between_the_write_backs_read_and_update_survives_its_retry(
    rt, helpdesk
):
    # The write-back reads the ticket (still as the webhook reported it) and decides to set
    # the group; an agent moves the ticket right then. Zendesk refuses the guarded update
    # (409), the deliver policy retries it, and the retry decides again on the agent's group.
    zendesk, _api = helpdesk
    with TestClient(create_app(rt, relay_interval=3600)) as client:
        sent = zendesk_ticket(101, group_id="360009", priority="Normal")
        ticket_id = ZENDESK.post(client, sent).json()["ticket_id"]
    dispatch_id = _route(rt, ticket_id)
    department = _department(rt, ticket_id)

    zendesk.after_next_read(101, lambda: zendesk.update_by_agent(101, group_id=AGENTS_GROUP))
    assert deliver_many_stage(rt, [dispatch_id]) == {dispatch_id: "retry"}
    ticket = zendesk.tickets[101]
    assert (ticket.group_id, ticket.comments) == (AGENTS_GROUP, [])
    with rt.sessions() as session:
        failed = session.scalars(
            select(Attempt).where(Attempt.ticket_id == ticket_id, Attempt.stage == "deliver")
        ).one()
        messages = session.scalars(
            select(OutboxMessage)
            .where(OutboxMessage.ticket_id == ticket_id, OutboxMessage.task == DELIVER_TASK)
            .order_by(OutboxMessage.id)
        ).all()
    assert failed.outcome == "retry" and "409" in (failed.error or "")
    # The first delivery's message, then the retry's, after the deliver policy's delay.
    first, retry = messages
    assert first.countdown == 0 and retry.countdown > 0

    # The retry's message, as a worker consumes it.
    assert deliver_many_stage(rt, [retry.args["dispatch_id"]]) == {dispatch_id: "delivered"}
    assert ticket.group_id == AGENTS_GROUP
    assert f"triage_{department}" in ticket.tags and {"billing", "vip"} <= set(ticket.tags)
    (comment,) = ticket.comments
    assert comment["body"].startswith(f"[triage] dispatch {dispatch_id}: routed to ")
    assert comment["body"].endswith("\ngroup left as an agent set it")


def test_a_customer_reply_reporting_the_agents_group_lets_the_new_routing_set_its_own(rt, helpdesk):
    # The latest webhook is what counts: an update (new customer text, routed again) that
    # reports the agent's group has seen that group, so triage's new routing sets its own.
    zendesk, _api = helpdesk
    with TestClient(create_app(rt, relay_interval=3600)) as client:
        ticket_id = ZENDESK.post(client, zendesk_ticket(101, group_id="360009")).json()["ticket_id"]
        first = _route(rt, ticket_id)
        zendesk.tickets[101].group_id = AGENTS_GROUP
        assert deliver_many_stage(rt, [first]) == {first: "delivered"}
        assert zendesk.tickets[101].group_id == AGENTS_GROUP
        update = {
            **zendesk_ticket(101, group_id=str(AGENTS_GROUP)),
            "event": "updated",
            "comment": {"id": 77, "body": "Still charged twice, please refund.", "public": True},
        }
        assert ZENDESK.post(client, update).json()["duplicate"] is False
    second = _route(rt, ticket_id)
    assert second != first
    assert deliver_many_stage(rt, [second]) == {second: "delivered"}
    assert zendesk.tickets[101].group_id == GROUPS[_department(rt, ticket_id)]
    assert "left as an agent" not in zendesk.tickets[101].comments[-1]["body"]


def test_a_freshdesk_webhook_carrying_the_groups_id_keeps_it_for_the_write_back(rt):
    # Its payload names the group; the write-back compares ids, which the ticket read gives.
    with TestClient(create_app(rt, relay_interval=3600)) as client:
        sent = freshdesk_ticket(202, ticket_group_id=43000009)
        ticket_id = FRESHDESK.post(client, sent).json()["ticket_id"]
    with rt.sessions() as session:
        ticket = session.get(Ticket, ticket_id)
        assert ticket is not None
        assert (ticket.extra["group"], ticket.extra["group_id"]) == ("Logistics", 43000009)
