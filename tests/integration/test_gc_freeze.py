"""The long-running processes freeze their start-up objects once started (`triage.gc_pauses`):
`triage worker` when it is ready, `triage serve` when its app has started, in every process of
`--workers N`. Real processes over PostgreSQL and Redis."""

from __future__ import annotations

import gc
import re

import pytest
from fastapi.testclient import TestClient

from tests.support.stack import (
    WorkerProcess,
    make_runtime,
    served_api,
    stack_env,
    truncate,
    wait_until,
)
from triage.ingest.app import create_app

# Once started, a worker's collector tracks some 280,000 objects, the API's some 158,000.
AT_LEAST = 100_000


def _frozen(output: str, process: str) -> list[int]:
    return [int(n) for n in re.findall(rf"{process}: (\d+) start-up objects frozen", output)]


def test_a_ready_worker_has_frozen_its_start_up_objects(pg_url, clean_redis):
    truncate(pg_url)
    with WorkerProcess(stack_env(pg_url, clean_redis), concurrency=4) as worker:
        counts = wait_until(lambda: _frozen(worker.full_log(), "worker"), 30, what="the freeze")
    assert len(counts) == 1 and counts[0] > AT_LEAST, worker.log()


@pytest.mark.parametrize("processes", [1, 2])
def test_every_api_process_freezes_its_start_up_objects(pg_url, clean_redis, processes):
    with served_api(stack_env(pg_url, clean_redis), workers=processes) as api:
        pass
    counts = _frozen(api.output, "api")
    assert len(counts) == processes and min(counts) > AT_LEAST, api.output[-3000:]


def test_an_app_mounted_in_another_process_leaves_its_heap_alone(pg_url, clean_redis):
    # `create_app()` is also what an application embedding the API calls (and the in-process
    # tests): freezing is for processes that are the API, which ask for it.
    truncate(pg_url)
    gc.unfreeze()
    with TestClient(create_app(make_runtime(stack_env(pg_url, clean_redis)))) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() == 0
    with TestClient(create_app(make_runtime(stack_env(pg_url, clean_redis)), freeze_gc=True)):
        frozen = gc.get_freeze_count()
    gc.unfreeze()
    assert frozen > AT_LEAST
