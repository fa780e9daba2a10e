"""Cheap reads of the bench database: how many tickets are finished, when, and how long each
spent in triage outside the model call. Tickets of one scenario are those above a watermark."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from triage.db.session import normalize_url

# Finished = its dispatch was delivered, or it was dead-lettered (visible, not lost).
_DONE = text(
    """
    SELECT (SELECT count(*) FROM dispatches
             WHERE ticket_id > :w AND delivered_at IS NOT NULL)
         + (SELECT count(*) FROM tickets WHERE id > :w AND state = 'dead_lettered')
    """
)
_TIMES = text(
    """
    SELECT extract(epoch FROM min(t.received_at)), extract(epoch FROM max(d.delivered_at)),
           extract(epoch FROM min(c.created_at)), extract(epoch FROM max(c.created_at)),
           avg(c.latency_ms)
      FROM tickets t
      LEFT JOIN dispatches d ON d.ticket_id = t.id
      LEFT JOIN classifications c ON c.id = d.classification_id
     WHERE t.id > :w
    """
)
# Time in triage minus the recorded model call: webhook commit -> dispatch delivered; and its
# two halves: up to the model call (publish, queue, claim) and after the label is stored
# (publish, queue, deliver). Last, the second of the run the ticket arrived in.
_OVERHEAD = text(
    """
    SELECT extract(epoch FROM d.delivered_at - t.received_at) * 1000 - c.latency_ms,
           extract(epoch FROM c.created_at - t.received_at) * 1000 - c.latency_ms,
           extract(epoch FROM d.delivered_at - c.created_at) * 1000,
           floor(extract(epoch FROM t.received_at - min(t.received_at) OVER ()))
      FROM tickets t
      JOIN dispatches d ON d.ticket_id = t.id AND d.delivered_at IS NOT NULL
      JOIN classifications c ON c.id = d.classification_id
     WHERE t.id > :w
    """
)


# Scenario 5's bound on a ticket's time outside the model call (its p99 target).
SLOW_MS = 100.0


class Probe:
    def __init__(self, db_url: str) -> None:
        self._engine = create_engine(normalize_url(db_url), pool_size=1, max_overflow=1)

    def watermark(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(text("SELECT coalesce(max(id), 0) FROM tickets")).scalar_one())

    def done(self, since: int) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(_DONE, {"w": since}).scalar_one())

    def states(self, since: int) -> dict[str, int]:
        with self._engine.connect() as conn:
            rows = conn.execute(
                text("SELECT state, count(*) FROM tickets WHERE id > :w GROUP BY state"),
                {"w": since},
            ).all()
        return {str(state): int(n) for state, n in rows}

    def times(self, since: int) -> dict[str, float | None]:
        with self._engine.connect() as conn:
            row = conn.execute(_TIMES, {"w": since}).one()
        keys = ("first_received", "last_delivered", "first_classified", "last_classified")
        out: dict[str, float | None] = {
            k: float(v) if v is not None else None for k, v in zip(keys, row[:4], strict=True)
        }
        out["mean_model_ms"] = float(row[4]) if row[4] is not None else None
        return out

    def overhead_ms(self, since: int) -> tuple[dict[str, list[float]], dict[int, int]]:
        """Per part, each ticket's time outside the model call; and per second of the run
        (from its first ticket), how many tickets spent over SLOW_MS there: whether slow
        tickets come in a burst or throughout."""
        with self._engine.connect() as conn:
            rows = conn.execute(_OVERHEAD, {"w": since}).all()
        parts = ("total", "before_model", "after_label")
        times = {
            part: [float(r[i]) for r in rows if r[i] is not None] for i, part in enumerate(parts)
        }
        slow = Counter(int(r[3]) for r in rows if r[0] is not None and float(r[0]) > SLOW_MS)
        return times, dict(sorted(slow.items()))

    def postmaster_pid(self) -> int:
        """The PostgreSQL server's main process, the parent of every backend (for CPU
        accounting; the server is on this machine)."""
        with self._engine.connect() as conn:
            backend = int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
        stat = Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()
        return int(stat[1])

    def dispose(self) -> None:
        self._engine.dispose()


def summary(values: list[float]) -> dict[str, Any]:
    from bench.load import percentile

    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 1),
        "p90": round(percentile(values, 90), 1),
        "p99": round(percentile(values, 99), 1),
        "max": round(max(values), 1) if values else None,
    }
