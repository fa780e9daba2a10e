"""`triage worker`, started as an operator starts it: a process of its own."""

from __future__ import annotations

import subprocess
import sys


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


def test_a_negative_concurrency_is_a_usage_error_not_a_traceback(env):
    result = subprocess.run(
        [sys.executable, "-m", "triage.cli.main", "worker", "-c", "-5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "--concurrency" in result.stderr
