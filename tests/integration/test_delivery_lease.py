"""A delivery in flight holds its dispatch for its lease: the longest its sinks' requests can
take, plus the claim grace. A second copy of its message leaves it alone until then, and after
it the delivery is presumed dead and sent again. So the lease has to cover a slow but healthy
delivery whatever its sinks do, and the delivery has to end its requests within it.

The Freshdesk write-back looks through a ticket's conversations for its own note: the ticket
with its first ten, then up to ten pages of a hundred, then the update and the note, thirteen
requests. A lease of "three requests per sink" ran out while such a delivery was still paging,
and a second copy wrote the update and the note a second time.

Real PostgreSQL and Redis, the stage run in-process as a worker's task threads run it, and a
real HTTP server standing in for Freshdesk, answering slowly.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.test_sinks import WEBHOOK_SECRET, delivery
from tests.support.fakehttp import FakeApi, Reply, running_api
from tests.support.stack import (
    config_with_sinks,
    in_background,
    make_runtime,
    routed_dispatch,
    stack_env,
    truncate,
)
from triage.config import PROJECT_ROOT, Settings, load_config
from triage.pipeline.deliver_stage import deliver_many_stage
from triage.pipeline.runtime import Runtime
from triage.sinks.loader import build_sink_table

GRACE_SECONDS = 5.0  # TRIAGE_CLAIM_GRACE_SECONDS at its minimum

FD_TICKET = "/api/v2/tickets/202?include=conversations"
FD_PAGE = "/api/v2/tickets/202/conversations?page={}&per_page=100"
FD_UPDATE = ("PUT", "/api/v2/tickets/202")
FD_NOTE = ("POST", "/api/v2/tickets/202/notes")
# The ticket read, ten full pages of conversations, the update and the note.
FRESHDESK_MOST_REQUESTS = 13


def _runtime(pg_url: str, redis_url: str, tmp_path: Path, api: FakeApi, timeout: float) -> Runtime:
    config = config_with_sinks(
        tmp_path,
        f"timeout_seconds: {timeout}\n"
        "helpdesks:\n"
        f"  freshdesk: {{base_url: '{api.url}', api_key_env: TRIAGE_TEST_FD_KEY}}\n"
        "default: [helpdesk]\n",
    )
    return make_runtime(
        stack_env(
            pg_url,
            redis_url,
            TRIAGE_CONFIG_DIR=str(config),
            TRIAGE_CLAIM_GRACE_SECONDS=str(GRACE_SECONDS),
        )
    )


def _routed_freshdesk_ticket(rt: Runtime) -> int:
    return routed_dispatch(rt, source="freshdesk", external_id="202", body="I want a refund")[1]


def _long_conversation(api: FakeApi, **answer: float) -> None:
    """A ticket with over a thousand conversations, none of them triage's note: the
    write-back reads every page it may, then updates and notes. Every answer is `answer`
    slow (as `Reply` takes it: its delay, its trickle)."""
    filler = [{"id": i, "body_text": f"reply {i}", "private": False} for i in range(100)]
    ticket = {"id": 202, "tags": [], "conversations": filler[:10]}
    api.script("GET", FD_TICKET, Reply(body=ticket, **answer))
    for page in range(1, 11):
        api.script("GET", FD_PAGE.format(page), Reply(body=filler, **answer))
    api.script(*FD_UPDATE, Reply(**answer))
    api.script(*FD_NOTE, Reply(**answer))


@pytest.fixture()
def freshdesk_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # The sink table is read when first used, from this process's environment.
    monkeypatch.setenv("TRIAGE_TEST_FD_KEY", "fd-key")


def test_a_slow_freshdesk_delivery_paging_its_conversations_is_not_sent_again_by_a_second_copy(
    pg_url, clean_redis, tmp_path, freshdesk_key
):
    truncate(pg_url)
    timeout = 1.2
    # What the lease was: three requests of the one sink timing out, plus the grace.
    three_requests_lease = 3 * timeout + GRACE_SECONDS
    with running_api() as api:
        rt = _runtime(pg_url, clean_redis, tmp_path, api, timeout)
        dispatch_id = _routed_freshdesk_ticket(rt)
        # Each answer well within the timeout: a slow helpdesk, not a failing one. Thirteen
        # of them take longer than three requests' lease.
        _long_conversation(api, delay=0.9)
        # The update goes out after eleven answers, a second after the old lease is over.
        assert three_requests_lease + 1 < 11 * 0.9

        began = time.monotonic()
        first, out = in_background(lambda: deliver_many_stage(rt, [dispatch_id]))
        time.sleep(max(0.0, began + three_requests_lease + 0.5 - time.monotonic()))
        # The first copy is alive and still paging: nothing written yet.
        assert FD_UPDATE not in api.calls() and FD_NOTE not in api.calls()
        second = deliver_many_stage(rt, [dispatch_id])
        first.join(timeout=60)
        calls = api.calls()

    # One update, one note: the second copy left the delivery to the worker sending it.
    assert (calls.count(FD_UPDATE), calls.count(FD_NOTE)) == (1, 1)
    assert len(calls) == FRESHDESK_MOST_REQUESTS
    assert second == {dispatch_id: "in_flight"}
    assert out["result"] == {dispatch_id: "delivered"}


def test_a_delivery_whose_answers_keep_arriving_ends_its_requests_by_its_deadline(
    pg_url, clean_redis, tmp_path, freshdesk_key
):
    # httpx's timeout bounds each read, not a request: an answer that waits a little under
    # the timeout for its headers and then arrives a few bytes at a time never trips it, and
    # each request takes longer than the timeout. Thirteen of them outran the thirteen
    # timeouts the lease counts on. The delivery's deadline cuts them there, leaving the
    # grace for the database, and the attempt fails as transient, to be retried.
    truncate(pg_url)
    timeout = 0.6
    with running_api() as api:
        rt = _runtime(pg_url, clean_redis, tmp_path, api, timeout)
        dispatch_id = _routed_freshdesk_ticket(rt)
        _long_conversation(api, delay=0.4, trickle=0.35)

        began = time.monotonic()
        outcome = deliver_many_stage(rt, [dispatch_id])
        took = time.monotonic() - began
        calls = api.calls()

    assert outcome == {dispatch_id: "retry"}
    assert took < FRESHDESK_MOST_REQUESTS * timeout + 1.0
    # Cut while paging: neither the update nor the note was sent.
    assert FD_UPDATE not in calls and FD_NOTE not in calls


# --- what each sink declares is what it makes at most -------------------------------------------


def _freshdesk_worst_case(api: FakeApi) -> None:
    _long_conversation(api)


def _zendesk_worst_case(api: FakeApi) -> None:
    # No comment of ours among the newest: its tags are added, the taxonomy's other triage
    # tags removed, the ticket read (the webhook reported its group and priority, so they are
    # compared), and the update follows.
    pass


def _django_helpdesk_worst_case(api: FakeApi) -> None:
    # Queue and priority still as the webhook reported them: the PATCH is made.
    ticket = {"id": 303, "queue": 9, "priority": 4, "followup_set": []}
    api.script("GET", "/api/tickets/303/", Reply(body=ticket))


# Each webhook reported the ticket's group and priority.
@pytest.mark.parametrize(
    ("source", "external_id", "script", "reported"),
    [
        ("freshdesk", "202", _freshdesk_worst_case, {"group_id": 9, "priority": "Low"}),
        ("zendesk", "101", _zendesk_worst_case, {"group_id": 9, "priority": "low"}),
        ("django-helpdesk", "303", _django_helpdesk_worst_case, {"queue_id": 9, "priority": 4}),
    ],
)
def test_a_write_back_makes_at_most_the_requests_its_sink_declares_and_the_lease_counts(
    source, external_id, script, reported, tmp_path, monkeypatch
):
    monkeypatch.setenv("T_FD_KEY", "k")
    monkeypatch.setenv("T_ZD_TOKEN", "t")
    monkeypatch.setenv("T_DH_PW", "p")
    monkeypatch.setenv("T_HOOK_SECRET", WEBHOOK_SECRET)
    with running_api() as api:
        (tmp_path / "sinks.yaml").write_text(
            "helpdesks:\n"
            f"  freshdesk: {{base_url: '{api.url}', api_key_env: T_FD_KEY}}\n"
            f"  zendesk: {{base_url: '{api.url}', email: b, api_token_env: T_ZD_TOKEN}}\n"
            f"  django-helpdesk: {{base_url: '{api.url}', username: u, password_env: T_DH_PW,"
            " queue_ids: {billing: 1}}\n"
            f"webhooks:\n  crm: {{url: '{api.url}/hooks', secret_env: T_HOOK_SECRET}}\n"
            "departments:\n  billing: [helpdesk, webhook:crm]\n"
        )
        table = build_sink_table(
            tmp_path / "sinks.yaml", load_config(Settings(config_dir=PROJECT_ROOT / "config"))
        )
        script(api)
        for sink in table.for_department("billing"):
            sink.deliver(delivery(source, external_id, metadata=reported))
        calls = api.calls()
    assert calls[-1] == ("POST", "/hooks")
    helpdesk, webhook = table.for_department("billing")
    # The writers' own worst case, exactly: the count is theirs, not a guess.
    assert len(calls) - 1 == helpdesk.writers[source].max_requests
    # And the lease counts every request of the department's sinks, one after another.
    assert table.requests_for("billing") == FRESHDESK_MOST_REQUESTS + 1
    assert webhook.max_requests == 1
