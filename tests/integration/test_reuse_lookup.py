"""Which earlier label a ticket with the same text reuses, on PostgreSQL and on SQLite (the
embedded default): the newest first-hand label in the window, from this taxonomy, backend and
the models it is configured with."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from tests.support.stack import make_runtime, stack_env, truncate
from triage.db.migrate import upgrade
from triage.db.models import Classification, Ticket, utcnow
from triage.db.session import get_sessionmaker, session_scope
from triage.pipeline.classify_requests import reusable_labels

SAME = "0" * 64


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request, pg_url, tmp_path):
    if request.param == "postgresql":
        truncate(pg_url)
        return pg_url
    url = f"sqlite:///{tmp_path / 'reuse.db'}"
    upgrade(url)
    return url


def test_the_newest_first_hand_label_in_the_window_is_reused(database_url, clean_redis):
    rt = make_runtime(stack_env(database_url, clean_redis))
    version, backend = rt.config.taxonomy.version, rt.backend.name
    (model,) = rt.backend.models
    now = utcnow()
    sessions = get_sessionmaker(database_url, 4)
    with session_scope(sessions) as s:
        tickets = [
            Ticket(
                source="generic",
                external_id=f"same-{i}",
                subject="s",
                body="b",
                content_hash=SAME if i < 6 else "1" * 64,
            )
            for i in range(7)
        ]
        s.add_all(tickets)
        s.flush()

        def label(i: int, minutes_ago: float, **fields: object) -> Classification:
            row = Classification(
                ticket_id=tickets[i].id,
                intent="billing",
                department="billing",
                priority="normal",
                language="en",
                sentiment="neutral",
                confidence=0.9,
                summary=f"label of ticket {i}",
                backend=fields.pop("backend", backend),
                model=fields.pop("model", model),
                taxonomy_version=fields.pop("taxonomy_version", version),
                prompt_version="p",
                created_at=now - timedelta(minutes=minutes_ago),
                **fields,
            )
            s.add(row)
            s.flush()
            return row

        label(0, 60)
        wanted = label(1, 30)
        label(2, 10, reused_from_id=wanted.id)  # second-hand: never a source
        label(3, 5, taxonomy_version="older")
        label(4, 5, backend="another")
        # Newest of all, but from a model the backend is no longer configured with.
        label(0, 2, model="retired-model")
        label(6, 1)  # other text
        ids = [t.id for t in tickets]
    with sessions() as s:
        asking = s.scalars(select(Ticket).where(Ticket.id.in_([ids[5], ids[6]]))).all()
        found = reusable_labels(rt, s, asking)
    assert {t: c.summary for t, c in found.items()} == {ids[5]: "label of ticket 1"}

    # Outside the window nothing is reused.
    rt.settings.reuse_window_hours = 0.25
    with sessions() as s:
        asking = s.scalars(select(Ticket).where(Ticket.id == ids[5])).all()
        assert reusable_labels(rt, s, asking) == {}
