"""`triage doctor` against the real services, a stopped database and the fake API."""

from __future__ import annotations

import json

from tests.fakeanthropic import Fault
from triage.embedded import free_port


def _by_name(report):
    return {c["name"]: c for c in report["checks"]}


def test_doctor_passes_when_everything_is_up(cli):
    result = cli("doctor", "--json")
    checks = _by_name(json.loads(result.stdout))
    assert {n: c["status"] for n, c in checks.items()} == {
        "config": "ok",
        "database": "ok",
        "broker": "ok",
        "anthropic api": "ok",
        "queues": "ok",
    }
    assert "migrations at head" in checks["database"]["detail"]
    assert "triage.classify 0" in checks["queues"]["detail"]


def test_doctor_reports_a_stopped_database_with_exit_1_and_what_to_do(cli):
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/triage"

    result = cli("doctor", code=1, DATABASE_URL=url)

    assert "unreachable" in result.stdout
    assert "database: what to do: start PostgreSQL or fix DATABASE_URL" in result.stdout
    assert "Traceback" not in result.output


def test_doctor_reports_a_rejected_key_and_an_unreachable_broker(cli, fake):
    fake.add_fault(Fault("auth"))
    report = cli("doctor", "--json", code=1, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    checks = _by_name(json.loads(report.stdout))
    assert checks["anthropic api"]["status"] == "problem"
    assert checks["anthropic api"]["todo"] == "set a valid ANTHROPIC_API_KEY"
    assert checks["broker"]["status"] == "problem"


def test_doctor_skips_the_api_on_the_offline_backend(cli):
    report = cli("doctor", "--json", TRIAGE_BACKEND="local")
    checks = _by_name(json.loads(report.stdout))
    assert checks["anthropic api"]["status"] == "skipped"
    assert "offline" in checks["anthropic api"]["detail"]


def test_doctor_reports_a_database_behind_on_migrations(cli, tmp_path):
    from triage.db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    upgrade(url, "0001")
    report = cli("doctor", "--json", code=1, DATABASE_URL=url)
    database = _by_name(json.loads(report.stdout))["database"]
    assert database["todo"] == "run `triage db upgrade`"


def test_doctor_reports_a_missing_sqlite_file_without_creating_it(cli, tmp_path):
    typo = tmp_path / "tirage.sqlite3"

    report = cli("doctor", "--json", code=1, DATABASE_URL=f"sqlite:///{typo}")

    database = _by_name(json.loads(report.stdout))["database"]
    assert f"the file {typo} does not exist" in database["detail"]
    assert "fix the path in DATABASE_URL" in database["todo"]
    assert not typo.exists()


def test_a_broken_config_does_not_hide_a_stopped_database(cli, tmp_path):
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/triage"

    report = cli("doctor", "--json", code=1, DATABASE_URL=url, TRIAGE_CONFIG_DIR=str(tmp_path))

    checks = _by_name(json.loads(report.stdout))
    assert checks["config"]["status"] == "problem"
    assert (
        checks["database"]["status"] == "problem" and "unreachable" in checks["database"]["detail"]
    )
    assert checks["broker"]["status"] == "ok"
    assert "did not load" in checks["queues"]["detail"]
