"""The per-message loggers a worker quiets, and leaves alone at DEBUG."""

from __future__ import annotations

import logging

import pytest

from triage.pipeline.worker_logs import PER_MESSAGE_LOGGERS, quiet_per_message_logs


@pytest.fixture()
def restore_levels():
    before = {name: logging.getLogger(name).level for name in PER_MESSAGE_LOGGERS}
    for name in PER_MESSAGE_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    yield
    for name, level in before.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("loglevel", ["INFO", "info", "WARNING"])
def test_below_debug_the_per_message_loggers_keep_to_warnings(restore_levels, loglevel):
    quiet_per_message_logs(loglevel)
    for name in PER_MESSAGE_LOGGERS:
        logger = logging.getLogger(name)
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)


@pytest.mark.parametrize("loglevel", ["DEBUG", "debug"])
def test_at_debug_they_are_left_alone(restore_levels, loglevel):
    quiet_per_message_logs(loglevel)
    assert all(logging.getLogger(name).level == logging.NOTSET for name in PER_MESSAGE_LOGGERS)
