"""`triage run` (what `make run` calls) on the embedded default: SQLite, an embedded Redis and
the offline model, no services and no API key. Every sample ends in a terminal state."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sqlalchemy import create_engine, select

from triage.config import PROJECT_ROOT
from triage.db.models import Classification, Ticket


def test_embedded_run_triages_every_sample(tmp_path):
    db = tmp_path / "run.sqlite3"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRIAGE_", "ANTHROPIC_")) and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env["DATABASE_URL"] = f"sqlite:///{db}"
    proc = subprocess.run(
        [sys.executable, "-m", "triage.cli.main", "run", "--exit-when-done", "--timeout", "180"],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "embedded Redis" in proc.stdout

    samples = sorted((PROJECT_ROOT / "config" / "samples").glob("*.json"))
    expected = {}
    for path in samples:
        payload = json.loads(path.read_text())
        expected[payload["external_id"]] = payload["metadata"].get("expected_intent")
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                Ticket.external_id, Ticket.state, Classification.intent, Classification.backend
            ).join(Classification, Classification.id == Ticket.current_classification_id)
        ).all()
    assert len(rows) == len(samples) >= 30
    assert all(r.state in ("routed", "needs_review") for r in rows)
    assert {r.backend for r in rows} == {"local"}
    # External ids carry a per-run suffix; the prefix is the sample's own id.
    correct = sum(1 for r in rows if expected[r.external_id.rsplit("-", 1)[0]] == r.intent)
    assert correct / len(rows) >= 0.8
