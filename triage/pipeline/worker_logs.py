"""Which log lines a worker writes for each message and each HTTP request.

Celery logs every task message twice at INFO ("received", then "succeeded" with the task's
return value) and httpx every request at INFO. A worker under load handles hundreds of each a
second: the lines cost 5-8% of its CPU (py-spy, `make bench`) and bury the warnings. The
database keeps each ticket's timeline (`triage tickets show`) and Prometheus the counts, so
these lines are written only at `--loglevel DEBUG`. Failures are still logged: Celery's at
ERROR, triage's own retries and dead letters at WARNING.
"""

from __future__ import annotations

import logging

# The anthropic SDK sends through httpx2, a fork of httpx with its own logger.
PER_MESSAGE_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "httpx", "httpx2")


def quiet_per_message_logs(loglevel: str) -> None:
    """Unless `loglevel` is DEBUG, keep the per-message and per-request loggers to warnings.
    Call it after Celery has set up logging and before the worker builds its task strategies
    (Celery reads each logger's level once, then): `after_setup_logger` is that moment."""
    if logging.getLevelName(loglevel.upper()) == logging.DEBUG:
        return
    for name in PER_MESSAGE_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
