"""`triage config validate` finds what stops a worker from starting, and says where."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.cli.conftest import Cli
from triage.config import PROJECT_ROOT


@pytest.fixture()
def config_dir(tmp_path: Path) -> Path:
    shutil.copytree(PROJECT_ROOT / "config", tmp_path / "config")
    return tmp_path / "config"


@pytest.fixture()
def offline(config_dir: Path) -> Cli:
    return Cli({"TRIAGE_CONFIG_DIR": str(config_dir), "TRIAGE_BACKEND": "local"})


def test_a_misspelt_department_in_sinks_yaml_fails_validation_naming_file_and_field(
    offline, config_dir
):
    (config_dir / "sinks.yaml").write_text("departments:\n  biling: [queue]\n")

    result = offline("config", "validate", code=2)

    assert "sinks.yaml: departments.biling: not a department in the taxonomy" in result.output
    assert "config is valid" not in result.output


def test_a_sink_secret_not_in_the_environment_fails_validation_naming_the_variable(
    offline, config_dir
):
    (config_dir / "sinks.yaml").write_text(
        "webhooks:\n  crm: {url: 'https://crm.example/hook', secret_env: T_CRM_SECRET}\n"
        "default: ['webhook:crm']\n"
    )

    result = offline("config", "validate", code=2)

    assert "webhooks.crm.secret_env: environment variable T_CRM_SECRET is not set" in (
        result.output
    )
    assert offline("config", "validate", T_CRM_SECRET="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")


def test_validation_says_which_sinks_file_it_checked(offline, config_dir):
    assert offline.json("config", "validate")["sinks"] == "none (queue messages only)"
    (config_dir / "sinks.yaml").write_text("default: [queue]\n")
    assert offline.json("config", "validate")["sinks"] == str(config_dir / "sinks.yaml")


def test_a_bad_setting_is_named_by_the_variable_an_operator_sets(offline):
    result = offline(
        "config", "validate", code=2, TRIAGE_WORKER_CONCURRENCY="0", TRIAGE_BATCH_SIZE="many"
    )

    assert "TRIAGE_WORKER_CONCURRENCY: Input should be greater than or equal to 1" in result.output
    assert "TRIAGE_BATCH_SIZE: Input should be a valid integer" in result.output


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("REDIS_URL", "localhost:6379"),
        ("REDIS_URL", "http://:s3cret@cache:6379/0"),
        ("TRIAGE_BROKER_URL", "rabbitmq:5672"),
        ("TRIAGE_BROKER_URL", "amqp//guest:s3cret@rabbit"),
    ],
)
def test_a_broker_or_redis_url_without_a_scheme_it_can_use_is_refused(offline, variable, value):
    # "localhost:6379" had kombu speak AMQP to the Redis port, retrying for ever.
    result = offline("config", "validate", code=2, **{variable: value})

    assert f"environment: {variable}: Value error, not a" in result.output
    assert "s3cret" not in result.output


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("REDIS_URL", "redis://:s3cret@cache:6379/0"),
        ("REDIS_URL", "rediss://cache:6380/0"),
        ("TRIAGE_BROKER_URL", "amqp://guest:guest@rabbit:5672//"),
        ("TRIAGE_BROKER_URL", "amqps://guest:guest@rabbit:5671//"),
    ],
)
def test_redis_and_broker_urls_with_their_schemes_are_valid(offline, variable, value):
    offline("config", "validate", **{variable: value})


def test_doctor_names_a_bad_broker_url_without_repeating_its_password(offline):
    result = offline(
        "doctor", "--json", code=1, TRIAGE_BROKER_URL="rabbit//guest:s3cret@rabbit:5672"
    )

    assert "environment: TRIAGE_BROKER_URL: Value error, not a broker URL" in result.stdout
    assert "s3cret" not in result.stdout


@pytest.mark.parametrize("url", ["notaurl", "", "postgresql+nodriver://db/triage"])
def test_a_database_url_start_up_could_not_use_fails_validation_naming_it(offline, url):
    # `triage worker` and `serve` stop on these; validation said "config is valid".
    result = offline("config", "validate", code=2, DATABASE_URL=url)

    assert "DATABASE_URL" in result.output and "config is valid" not in result.output


def test_a_postgresql_url_is_valid_without_connecting(offline):
    offline("config", "validate", DATABASE_URL="postgresql://triage:pw@127.0.0.1:1/triage")


def test_doctor_finds_the_sinks_yaml_mistake_that_stops_a_worker(offline, config_dir):
    (config_dir / "sinks.yaml").write_text("departments:\n  biling: [queue]\n")

    result = offline("doctor", "--json", code=1)

    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["config"]["status"] == "problem"
    assert "departments.biling: not a department" in checks["config"]["detail"]


def test_a_misspelt_triage_variable_is_warned_about_with_the_setting_it_looks_like(offline):
    # TRIAGE_CLASSIFY_MAX_ATTEMPT (no S) was ignored without a word: the default 6 applied.
    result = offline("config", "validate", TRIAGE_CLASSIFY_MAX_ATTEMPT="2")

    assert (
        "warning: TRIAGE_CLASSIFY_MAX_ATTEMPT (did you mean TRIAGE_CLASSIFY_MAX_ATTEMPTS?) "
        "is set but is not a triage setting; ignored"
    ) in result.output
    assert "config is valid" in result.output
    assert offline.json("config", "validate", TRIAGE_CLASSIFY_MAX_ATTEMPT="2")[
        "unknown_variables"
    ] == ["TRIAGE_CLASSIFY_MAX_ATTEMPT (did you mean TRIAGE_CLASSIFY_MAX_ATTEMPTS?)"]


def test_secrets_named_by_sinks_yaml_are_not_unknown(offline, config_dir):
    (config_dir / "sinks.yaml").write_text(
        "webhooks:\n  crm: {url: 'https://crm.example/hook', secret_env: TRIAGE_SINK_SECRET_CRM}\n"
    )
    report = offline.json(
        "config",
        "validate",
        TRIAGE_SINK_SECRET_CRM="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        TRIAGE_WORKER_CONCURRENCY="20",
    )
    assert report["unknown_variables"] == []
