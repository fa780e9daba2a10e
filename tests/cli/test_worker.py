"""`triage worker`, started as an operator starts it: a process of its own."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from triage.config import PROJECT_ROOT


def test_a_worker_on_a_queue_triage_never_publishes_to_refuses_to_start(env):
    result = subprocess.run(
        [sys.executable, "-m", "triage.cli.main", "worker", "-Q", "triage.classify,dept.biling"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2, result.stderr
    assert "dept.biling is not a triage queue" in result.stderr
    assert "dept.billing" in result.stderr and "Traceback" not in result.stderr


def test_a_worker_with_a_mistake_in_sinks_yaml_refuses_to_start(env, tmp_path):
    # Before, sinks.yaml was first read by a delivery: the worker started, then failed every
    # routed ticket's delivery with the ConfigError.
    config_dir = tmp_path / "config"
    shutil.copytree(PROJECT_ROOT / "config", config_dir)
    (config_dir / "sinks.yaml").write_text("departments:\n  biling: [queue]\n")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "triage.cli.main", "worker"],
            env={**env, "TRIAGE_CONFIG_DIR": str(config_dir)},
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the worker started despite a misspelt department in sinks.yaml")

    assert result.returncode == 2, result.stderr
    assert "sinks.yaml: departments.biling: not a department" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_negative_concurrency_is_a_usage_error_not_a_traceback(env):
    result = subprocess.run(
        [sys.executable, "-m", "triage.cli.main", "worker", "-c", "-1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2, result.stderr
    assert "Invalid value for '--concurrency'" in result.stderr
    assert "Traceback" not in result.stderr
