"""Which log lines a worker writes for each message and each HTTP request.

Celery logs every task message twice at INFO ("received", then "succeeded" with the task's
return value) and httpx every request at INFO. A worker under load handles hundreds of each a
second: the lines cost 5-8% of its CPU (py-spy, `make bench`) and bury the warnings. The
database keeps each ticket's timeline (`triage tickets show`) and Prometheus the counts, so
these lines are written only at `--loglevel DEBUG`. Failures are still logged: Celery's at
ERROR, triage's own retries and dead letters at WARNING.

Celery's failure line shows the exception as its `repr()` and its traceback as `exc_info`
would print it: a failure's text can quote a ticket (see `triage.errors`), so that line is
rewritten to name it as triage's own log lines do.
"""

from __future__ import annotations

import logging

from triage.errors import loggable, loggable_traceback

# The anthropic SDK sends through httpx2, a fork of httpx with its own logger.
PER_MESSAGE_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "httpx", "httpx2")
# Where Celery logs a task's failure ("Task ... raised unexpected: ...") and retry.
TASK_TRACE_LOGGER = "celery.app.trace"


class ContentFreeFailures(logging.Filter):
    """Celery's failure lines with the exception named by `loggable()`: its type or triage's
    summary, and a traceback of frames without the exception's text."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        shown = loggable(exc)
        if isinstance(record.args, dict):
            record.args = {**record.args, "exc": shown, "traceback": ""}
        data = record.__dict__.get("data")  # Celery's `extra`, for structured handlers
        if isinstance(data, dict):
            record.__dict__["data"] = {**data, "exc": shown, "traceback": ""}
        # A formatter prints `exc_text` as it is, and formats `exc_info` only when that is unset.
        record.exc_info = None
        record.exc_text = loggable_traceback(exc)
        return True


_FAILURES_FILTER = ContentFreeFailures()


def content_free_task_failures() -> None:
    """Install `ContentFreeFailures` on Celery's task trace logger (once; idempotent)."""
    logging.getLogger(TASK_TRACE_LOGGER).addFilter(_FAILURES_FILTER)


def quiet_per_message_logs(loglevel: str) -> None:
    """Unless `loglevel` is DEBUG, keep the per-message and per-request loggers to warnings.
    Call it after Celery has set up logging and before the worker builds its task strategies
    (Celery reads each logger's level once, then): `after_setup_logger` is that moment."""
    if logging.getLevelName(loglevel.upper()) == logging.DEBUG:
        return
    for name in PER_MESSAGE_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
