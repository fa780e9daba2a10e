"""`triage run` (what `make run` calls) on the embedded default: SQLite, an embedded Redis and
the offline model, no services and no API key. Every sample ends in a terminal state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import create_engine, func, select, text

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
    correct = sum(1 for r in rows if expected[r.external_id] == r.intent)
    assert correct / len(rows) >= 0.8


def _embedded_env(db) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRIAGE_", "ANTHROPIC_")) and k not in ("DATABASE_URL", "REDIS_URL")
    }
    env["DATABASE_URL"] = f"sqlite:///{db}"
    return env


def test_a_second_run_finds_the_samples_instead_of_classifying_them_again(tmp_path):
    db = tmp_path / "run.sqlite3"
    command = [sys.executable, "-m", "triage.cli.main", "run", "--exit-when-done"]
    for _ in range(2):
        proc = subprocess.run(
            command,
            env=_embedded_env(db),
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert "all were stored by an earlier run" in proc.stdout
    samples = list((PROJECT_ROOT / "config" / "samples").glob("*.json"))
    with create_engine(f"sqlite:///{db}").connect() as conn:
        tickets = conn.execute(select(func.count()).select_from(Ticket)).scalar_one()
        labels = conn.execute(select(func.count()).select_from(Classification)).scalar_one()
    assert tickets == labels == len(samples)
    # Its own line, not glued to the table's bottom border (stdout here is not a terminal).
    assert f"\n{len(samples)} tickets terminal in " in proc.stdout


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(path, text: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        output = path.read_text()
        if text in output:
            return output
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared:\n{path.read_text()[-3000:]}")


@pytest.mark.parametrize("stop", ["ctrl-c", "kill"])
def test_a_serving_run_takes_a_pasted_send_and_stops_every_child_cleanly(tmp_path, stop):
    """The printed `triage send` line works as pasted; Ctrl-C (SIGINT to the terminal's whole
    process group) or `kill <pid>` stops the API, the worker and the embedded Redis, the
    Redis last, with no traceback and no orphan."""
    var, out = tmp_path / "var", tmp_path / "out.txt"
    with out.open("w") as sink:
        run = subprocess.Popen(
            [sys.executable, "-m", "triage.cli.main", "run", "--var", str(var)],
            env=_embedded_env(tmp_path / "run.sqlite3"),
            cwd=PROJECT_ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        output = _wait_for(out, "tickets posted from now on")
        send = next(line for line in output.splitlines() if " send --url " in line)
        sent = subprocess.run(
            send.strip(), shell=True, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        _wait_for(out, "'Charged twice': billing")
        children = _children(run.pid)
        assert len(children) == 3  # embedded Redis, worker, API

        if stop == "ctrl-c":
            os.killpg(run.pid, signal.SIGINT)
        else:
            run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 0
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    output = out.read_text()
    assert "stopping…" in output and "Traceback" not in output, output[-3000:]
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if _alive(pid)]
    # The worker's broker outlived it: no reconnect attempts while it shut down.
    assert "Cannot connect" not in (var / "worker.log").read_text()


def test_a_run_after_one_stopped_mid_way_triages_what_that_run_left_queued(tmp_path):
    """The earlier run's messages were in its embedded Redis, which kept nothing: the new
    run sends its unfinished tickets again at once, not after the sweeper's deadline."""
    db = tmp_path / "run.sqlite3"
    command = [sys.executable, "-m", "triage.cli.main", "run", "--exit-when-done"]
    first = subprocess.run(
        command, env=_embedded_env(db), cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        # As a run stopped between the webhook and the worker leaves a ticket.
        conn.execute(
            text(
                "UPDATE tickets SET state = 'queued', department = NULL, "
                "current_classification_id = NULL WHERE id <= 3"
            )
        )
        for table in ("dispatches", "attempts", "classifications"):
            conn.execute(text(f"DELETE FROM {table} WHERE ticket_id <= 3"))

    second = subprocess.run(
        [*command, "--timeout", "60"],
        env=_embedded_env(db),
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )

    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "sent 3 tickets an earlier run left unfinished" in second.stdout
    with engine.connect() as conn:
        states = conn.execute(select(Ticket.state).where(Ticket.id <= 3)).scalars().all()
    assert set(states) <= {"routed", "needs_review"}
