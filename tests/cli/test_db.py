"""`triage db` on a SQLite file of the test's own."""

from __future__ import annotations


def test_upgrade_says_the_revision_the_database_is_at_not_the_one_asked_for(cli, tmp_path):
    url = f"sqlite:///{tmp_path / 'triage.sqlite3'}"
    cli("db", "upgrade", DATABASE_URL=url)
    head = cli("db", "current", DATABASE_URL=url).stdout.split("latest: ")[1].strip()

    result = cli("db", "upgrade", "0002", DATABASE_URL=url)

    assert f"is at {head}" in result.stdout and head != "0002"


def test_upgrade_to_an_unknown_revision_is_one_line_and_exit_2(cli, tmp_path):
    url = f"sqlite:///{tmp_path / 'triage.sqlite3'}"

    result = cli("db", "upgrade", "nosuch", code=2, DATABASE_URL=url)

    assert "db upgrade nosuch: Can't locate revision identified by 'nosuch'" in result.output
    assert "Traceback" not in result.output and result.output.strip().count("\n") == 0
