"""Metrics of an API served by several processes (`triage serve --workers N`).

Each uvicorn worker process counts in its own memory, and a scrape reaches whichever process
accepts it: `triage_webhooks_total` went up and down between scrapes, and each figure was one
process's share. prometheus_client's multiprocess mode keeps every process's values in files
under PROMETHEUS_MULTIPROC_DIR and sums them at scrape time. It must be set before a process
imports prometheus_client, so `serve` sets it before uvicorn starts the workers (they are new
interpreters that inherit the environment), in a fresh directory removed at exit: values left
from an earlier run would be added to this one's.

A directory set by the operator (gunicorn and other process managers) is used as it is; its
owner empties it between runs, as prometheus_client documents.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def shared_metrics_dir() -> Iterator[str]:
    """PROMETHEUS_MULTIPROC_DIR for the processes started inside: the operator's, or a fresh
    one removed afterwards."""
    given = os.environ.get(ENV)
    if given:
        yield given
        return
    path = tempfile.mkdtemp(prefix="triage-metrics-")
    os.environ[ENV] = path
    try:
        yield path
    finally:
        del os.environ[ENV]
        shutil.rmtree(path, ignore_errors=True)


def process_metrics() -> bytes:
    """This process's metrics in the exposition format; every process's, summed, when they
    share a PROMETHEUS_MULTIPROC_DIR."""
    if not os.environ.get(ENV):
        return generate_latest()
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
