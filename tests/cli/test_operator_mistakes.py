"""Operator mistakes get one line and exit 2 (usage) or 1 (not found), never a traceback."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import seed_routed


def _one_line_error(result, code: int) -> str:
    assert result.exit_code == code, f"exit {result.exit_code}\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0, result.output
    return result.output


@pytest.mark.parametrize(
    "args",
    [
        ("tickets", "list", "--since", "1000000d"),
        ("tickets", "list", "--until", "99999999999999999999w"),
        ("stats", "--since", "99999999999d"),
        ("reprocess", "--since", "99999999999d", "--dry-run"),
        ("dlq", "list", "--since", "99999999999999999999w"),
    ],
)
def test_a_relative_moment_before_the_year_1_is_a_usage_error(cli, args):
    output = _one_line_error(cli(*args, code=None), 2)
    assert "too far back" in output


@pytest.mark.parametrize(
    "args", [("tickets", "list"), ("tickets", "show", "1"), ("dlq", "list"), ("stats",)]
)
def test_a_malformed_database_url_is_one_line_naming_database_url(cli, args):
    output = _one_line_error(cli(*args, code=None, DATABASE_URL="notaurl"), 2)
    assert "DATABASE_URL" in output


def test_doctor_reports_a_malformed_database_url_as_a_problem_with_what_to_do(cli):
    result = cli("doctor", "--json", code=1, DATABASE_URL="notaurl")

    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["database"]["status"] == "problem"
    assert "not a database URL" in checks["database"]["detail"]
    assert "DATABASE_URL" in checks["database"]["todo"]
    assert checks["config"]["status"] == "ok"


BEYOND_BIGINT = str(2**63)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("tickets", "show", BEYOND_BIGINT), f"ticket {BEYOND_BIGINT} not found"),
        (("dlq", "show", BEYOND_BIGINT), f"dead letter {BEYOND_BIGINT} not found"),
        (("dlq", "replay", BEYOND_BIGINT, "--yes"), f"dead letter {BEYOND_BIGINT} not found"),
        (("dlq", "replay", "5", "--yes"), "dead letter 5 not found"),
    ],
)
def test_an_id_no_row_can_have_is_not_found(cli, args, message):
    output = _one_line_error(cli(*args, code=None), 1)
    assert message in output
    assert "database error" not in output


@pytest.mark.parametrize(
    "args",
    [
        ("reprocess", BEYOND_BIGINT, "--yes"),
        ("reprocess", BEYOND_BIGINT, "--dry-run"),
        ("reprocess", "--resume", BEYOND_BIGINT, "--yes"),
        ("backfill", BEYOND_BIGINT, "--yes"),
    ],
)
def test_reprocess_refuses_an_id_no_row_can_have_as_a_usage_error(cli, args):
    output = _one_line_error(cli(*args, code=None), 2)
    assert "database error" not in output


def test_an_id_file_with_an_id_beyond_bigint_is_a_usage_error(cli, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text(f"1\n{BEYOND_BIGINT}\n")

    output = _one_line_error(cli("reprocess", "--from-file", str(ids), "--yes", code=None), 2)

    assert f"ids.txt:2: '{BEYOND_BIGINT}' is not a ticket id" in output


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_dlq_list_limit_below_one_is_a_usage_error_as_for_tickets(cli, limit):
    for command in (("dlq", "list"), ("tickets", "list")):
        output = _one_line_error(cli(*command, "--limit", limit, code=None), 2)
        assert "--limit must be at least 1" in output


@pytest.mark.parametrize(
    "args",
    [
        ("serve", "--port", "70000"),
        ("serve", "--port", "0"),
        ("run", "--port", "70000"),
        ("run", "--port", "-1"),
    ],
)
def test_a_port_outside_the_tcp_range_is_a_usage_error_before_anything_starts(
    cli, args, monkeypatch
):
    import uvicorn

    import triage.cli.run

    def started(*args, **kwargs):
        raise AssertionError("started with an invalid port")

    monkeypatch.setattr(uvicorn, "run", started)
    monkeypatch.setattr(triage.cli.run, "_spawn", started)

    result = cli(*args, code=None)

    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}"
    assert "--port" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args", [("list",), ("replay", "--yes"), ("purge", "--yes", "--include-open")]
)
def test_dlq_unknown_stage_is_a_usage_error(cli, args):
    output = _one_line_error(cli("dlq", *args, "--stage", "nosuch", code=None), 2)
    assert "--stage 'nosuch': one of classify, deliver" in output


def test_dlq_replay_by_filter_that_matches_nothing_says_so(cli):
    result = cli("dlq", "replay", "--stage", "classify", "--yes")
    assert "no matching dead letters" in result.output


@pytest.mark.parametrize("timeout", ["0", "-1"])
def test_doctor_timeout_must_be_positive(cli, timeout):
    result = cli("doctor", "--timeout", timeout, code=2)
    assert "--timeout" in result.output


@pytest.mark.parametrize(
    "args",
    [("tickets", "list"), ("tickets", "show", "1"), ("db", "current"), ("dlq", "list")],
)
def test_an_invalid_setting_in_the_environment_is_one_line_naming_it(cli, args):
    output = _one_line_error(cli(*args, code=None, TRIAGE_MAX_TOKENS="2"), 2)

    assert "environment: TRIAGE_MAX_TOKENS: Input should be greater than or equal to 64" in output


@pytest.mark.parametrize("command", ["list", "replay", "purge"])
def test_dlq_time_options_say_they_go_by_when_the_letter_was_written(cli, command):
    result = cli("dlq", command, "--help", COLUMNS="200")

    assert "Dead-lettered at or after" in result.output
    assert "Dead-lettered before" in result.output
    assert "Received" not in result.output


@pytest.mark.parametrize(
    "command",
    [("tickets", "list"), ("reprocess", "--dry-run"), ("backfill", "--batch", "--dry-run")],
)
def test_a_mistyped_source_department_or_intent_is_a_usage_error_not_no_match(cli, command):
    typos = (
        ("--source", "zendsk"),
        ("--department", "billng"),
        ("--intent", "refnd"),
        ("--model", "claude-haiku-4.5"),
        ("--taxonomy-version", "3f2a9d"),
    )
    for option, typo in typos:
        output = _one_line_error(cli(*command, option, typo, code=None), 2)
        assert f"{option} '{typo}'" in output


def test_label_names_only_older_tickets_have_still_select_them(cli, rt):
    (old,) = seed_routed(
        rt, ["From before the reorganisation"], intent="gone", department="gone", model="retired"
    )

    listed = cli.json("tickets", "list", "--department", "gone", "--intent", "gone")
    by_label = cli.json(
        "tickets", "list", "--model", "retired", "--taxonomy-version", "old-taxonomy"
    )

    assert [t["ticket_id"] for t in listed] == [old]
    assert [t["ticket_id"] for t in by_label] == [old]


@pytest.mark.parametrize(
    "command",
    [
        ("tickets", "list"),
        ("reprocess", "--dry-run"),
        ("dlq", "list"),
        ("dlq", "purge"),
        ("stats",),
    ],
)
def test_a_window_that_ends_before_it_starts_is_a_usage_error_not_no_match(cli, command):
    for since, until in (("7d", "30d"), ("2026-11-02", "2026-11-01")):
        output = _one_line_error(cli(*command, "--since", since, "--until", until, code=None), 2)
        assert f"--since '{since}' is not before --until '{until}'" in output


@pytest.mark.parametrize("args", [("list",), ("replay", "--yes"), ("purge", "--yes")])
def test_dlq_mistyped_error_type_is_a_usage_error_not_no_match(cli, args):
    output = _one_line_error(cli("dlq", *args, "--error-type", "PermanentEror", code=None), 2)

    assert "--error-type 'PermanentEror': no dead letter has it" in output
    assert "PermanentError" in output
    assert cli.json("dlq", "list", "--error-type", "Refused") == []


@pytest.mark.parametrize("value", ["50", "0", "-0.1", "1.5"])
def test_a_confidence_outside_0_to_1_is_a_usage_error_not_every_ticket(cli, rt, fake, value):
    seed_routed(rt, ["Sure of this one"], confidence=0.99)

    for command in (("tickets", "list"), ("reprocess", "--yes")):
        output = _one_line_error(cli(*command, "--confidence-below", value, code=None), 2)
        assert "a confidence is between 0 and 1" in output
    assert fake.call_count() == 0


def test_an_id_file_too_long_for_one_query_is_a_usage_error_not_a_database_error(cli, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(str(n) for n in range(1, 70_001)))

    for command in (("reprocess", "--dry-run"), ("backfill", "--batch", "--dry-run")):
        output = _one_line_error(cli(*command, "--from-file", str(ids), code=None), 2)
        assert "70,000 ticket ids: at most 30,000 per run" in output


def test_worker_help_gives_the_setting_as_the_concurrency_default_not_zero(cli):
    # "[default: 0]" read as "no threads"; 0 only means "not given: use the setting".
    result = cli("worker", "--help", COLUMNS="200")

    assert "TRIAGE_WORKER_CONCURRENCY" in result.output
    assert "[default: 0]" not in result.output


def _nothing_starts(monkeypatch):
    import triage.cli.run

    def started(*args, **kwargs):
        raise AssertionError("started something")

    monkeypatch.setattr(triage.cli.run, "_spawn", started)


def test_run_on_a_port_in_use_says_so_in_one_line_before_starting_anything(cli, monkeypatch):
    import socket

    _nothing_starts(monkeypatch)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        output = _one_line_error(cli("run", "--port", str(port), code=None), 1)

    assert f"port {port} on 127.0.0.1 is in use" in output


def test_run_with_a_var_folder_it_cannot_write_says_so_in_one_line(cli, monkeypatch, tmp_path):
    _nothing_starts(monkeypatch)
    not_a_folder = tmp_path / "var"
    not_a_folder.write_text("")

    output = _one_line_error(cli("run", "--var", str(not_a_folder / "sub"), code=None), 1)

    assert "must be a writable folder" in output


def test_send_without_the_generic_secret_is_a_usage_error(cli):
    output = _one_line_error(
        cli("send", "--body", "hi", TRIAGE_WEBHOOK_SECRET_GENERIC="", code=None), 2
    )
    assert "TRIAGE_WEBHOOK_SECRET_GENERIC is not set" in output


def test_send_to_an_api_that_is_not_there_says_so_in_one_line(cli):
    from triage.embedded import free_port

    url = f"http://127.0.0.1:{free_port()}"
    result = cli("send", "--body", "hi", "--url", url, TRIAGE_WEBHOOK_SECRET_GENERIC="x", code=None)
    output = _one_line_error(result, 1)
    assert f"no answer from {url}" in output


def test_run_with_a_broker_url_nothing_answers_says_so_in_one_line(cli, monkeypatch):
    from triage.embedded import free_port

    _nothing_starts(monkeypatch)
    down = f"redis://127.0.0.1:{free_port()}/0"

    output = _one_line_error(cli("run", REDIS_URL=down, code=None), 1)

    assert "broker unreachable" in output and "REDIS_URL" in output
