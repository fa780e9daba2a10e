"""`triage tickets list/show` and `triage stats` over tickets the real pipeline triaged, on
PostgreSQL and on SQLite."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import Cli
from tests.fakeanthropic import Fault
from tests.support.stack import make_runtime, stack_env
from triage.db.migrate import upgrade
from triage.db.repo import accept_ticket
from triage.db.session import session_scope
from triage.ingest.models import InboundTicket
from triage.pipeline.classify_stage import classify_ticket_stage

TICKETS = [
    ("a1", "Parcel never came [[intent:shipping]]"),
    ("a2", "Paquete perdido [[intent:shipping]] [[language:es]]"),
    ("a3", "Charged twice [[intent:billing]]"),
    ("a4", "Not sure what I need [[intent:other]] [[confidence:0.3]]"),
    ("a5", "Refund now [[intent:refund]] fails-once"),
    ("a6", "Nonsense [[intent:feedback]] reject-me"),
]


def triage_through_the_pipeline(rt, fake) -> dict[str, int]:
    """Accept and classify each ticket with the real stage code and the fake API: one
    routed after a retry, one in review, one dead-lettered."""
    fake.add_fault(Fault("server_error", match="fails-once"))
    fake.add_fault(Fault("bad_request", match="reject-me"))
    ids = {}
    for external_id, body in TICKETS:
        inbound = InboundTicket(
            source="generic", external_id=external_id, subject="Help", body=body
        )
        with session_scope(rt.sessions) as session:
            ids[external_id] = accept_ticket(session, inbound).ticket_id
        outcome = classify_ticket_stage(rt, ids[external_id])
        if outcome == "retry":
            classify_ticket_stage(rt, ids[external_id])
    return ids


def test_tickets_list_filters_and_show_timeline(cli, rt, fake):
    ids = triage_through_the_pipeline(rt, fake)

    everything = cli.json("tickets", "list")
    assert len(everything) == 6
    shipping = cli.json("tickets", "list", "--intent", "shipping", "--state", "routed")
    assert {t["ticket_id"] for t in shipping} == {ids["a1"], ids["a2"]}
    unsure = cli.json("tickets", "list", "--confidence-below", "0.5")
    assert [t["state"] for t in unsure] == ["needs_review"]
    assert cli.json("tickets", "list", "--model", "claude-opus-5") == []
    assert len(cli.json("tickets", "list", "--since", "1h", "--source", "generic")) == 6
    assert cli.json("tickets", "list", "--until", "2020-01-01") == []
    assert cli("tickets", "list", "--state", "bogus", code=2).output.count("\n") <= 2

    shown = cli.json("tickets", "show", str(ids["a5"]))
    events = [e["event"] for e in shown["timeline"]]
    assert events[0] == "received"
    attempts = [e["detail"] for e in shown["timeline"] if e["event"] == "attempt"]
    assert [(a["outcome"], a["error_type"]) for a in attempts] == [
        ("retry", "TransientError"),
        ("ok", None),
    ]
    assert "500" in attempts[0]["error"]
    label = next(e["detail"] for e in shown["timeline"] if e["event"] == "classification")
    assert label["model"] == "claude-haiku-4-5" and label["input_tokens"] > 0
    assert float(label["cost_usd"]) > 0 and label["taxonomy_version"]
    assert "dispatch" in events

    dead = cli.json("tickets", "show", str(ids["a6"]))
    assert [e["event"] for e in dead["timeline"]][-1] == "dead_letter"
    human = cli("tickets", "show", str(ids["a5"])).stdout
    assert "TransientError" in human and "claude-haiku-4-5" in human
    assert "not found" in cli("tickets", "show", "999999", code=1).output


def test_stats_counts_rates_cost_and_label_changes(cli, rt, fake):
    ids = triage_through_the_pipeline(rt, fake)
    cli.json("reprocess", str(ids["a1"]), "--yes")  # same text, same label: unchanged

    stats = cli.json("stats", "--since", "1h")

    assert stats["tickets"] == 6
    assert stats["by_state"] == {"routed": 4, "needs_review": 1, "dead_lettered": 1}
    assert stats["by_intent"]["shipping"] == 2 and stats["by_language"] == {"en": 4, "es": 1}
    assert stats["rates"]["dead_letter_rate"] == round(1 / 6, 4)
    assert stats["rates"]["review_rate"] == round(1 / 6, 4)
    assert stats["latency"]["classify"]["n"] == 6  # five first labels and one reprocess
    assert stats["latency"]["received_to_dispatch"]["n"] == 5
    p = stats["latency"]["model_call"]
    assert p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"]
    assert stats["usage"]["labels"] == 6 and float(stats["usage"]["cost_usd"]) > 0
    per_1000 = stats["usage"]["per_1000_tickets"]
    assert per_1000["input_tokens"] == round(stats["usage"]["input_tokens"] * 1000 / 6)
    assert stats["reprocessing"] == {"relabelled": 1, "labels_changed": 0, "change_rate": 0.0}
    assert "per 1,000 tickets" in cli("stats").stdout
    assert cli.json("stats", "--until", "2020-01-01")["tickets"] == 0


@pytest.fixture()
def sqlite_cli(tmp_path, clean_redis, fake):
    url = f"sqlite:///{tmp_path / 'triage.sqlite3'}"
    upgrade(url)
    fake.clear_faults()
    fake.reset_stats()
    env = stack_env(
        url,
        clean_redis,
        TRIAGE_BACKEND="anthropic",
        ANTHROPIC_API_KEY="sk-test",
        ANTHROPIC_BASE_URL=fake.base_url,
        TRIAGE_ESCALATION_MODEL="",
    )
    return Cli(env), make_runtime(env)


def test_the_commands_work_on_sqlite(sqlite_cli, fake):
    cli, rt = sqlite_cli
    ids = triage_through_the_pipeline(rt, fake)

    assert len(cli.json("tickets", "list", "--since", "1d")) == 6
    assert cli.json("tickets", "show", str(ids["a3"]))["labels"]["intent"] == "billing"
    summary = cli.json("reprocess", "--state", "routed", "--yes", "-c", "2")
    assert summary["done"] == 4 and summary["outcomes"] == {"routed": 4}
    stats = cli.json("stats")
    assert stats["tickets"] == 6 and stats["reprocessing"]["relabelled"] == 4
    assert stats["latency"]["classify"]["p99_ms"] is not None
    letters = cli.json("dlq", "list")
    assert len(letters) == 1
    assert cli.json("dlq", "replay", str(letters[0]["id"]))["replayed"][0]["ticket_id"] == ids["a6"]
    assert json.loads(cli("doctor", "--json").stdout)["ok"] is True
