"""The anchor: a bare Celery two-hop pipeline on the same broker, pool and concurrency as
triage, with no database and no model call. Task A does nothing but send task B; B counts
completions in Redis. It is what a hand-written Celery task costs, and triage's CPU-bound
throughput is reported as a ratio to it.

The worker side runs as `celery -A bench.anchor worker` with BENCH_BROKER_URL set; the
Celery settings that change the cost per message (late ack, prefetch of one, JSON, no
results, no log line per message) are the ones triage uses, so the comparison is of the work,
not of the settings.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import after_setup_logger

from bench.infra import CpuMeter, Proc, wait_until
from triage.pipeline.worker_logs import quiet_per_message_logs

QUEUE_A = "bench.a"
QUEUE_B = "bench.b"
DONE_KEY = "bench:anchor:done"
END_KEY = "bench:anchor:end"

app = Celery("bench_anchor", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/14"))
app.conf.update(
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": 7200},
    task_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)
_counter: redis.Redis[bytes] | None = None


def _quiet(**_: Any) -> None:
    quiet_per_message_logs("INFO")  # the anchor's workers run at INFO, as triage's do


after_setup_logger.connect(_quiet, weak=False)


def _redis() -> redis.Redis[bytes]:
    global _counter
    if _counter is None:
        _counter = redis.Redis.from_url(app.conf.broker_url)
    return _counter


@app.task(name="bench.anchor.classify")  # type: ignore[untyped-decorator]
def classify(ticket: int, total: int) -> None:
    app.send_task("bench.anchor.dispatch", args=[ticket, total], queue=QUEUE_B)


@app.task(name="bench.anchor.dispatch")  # type: ignore[untyped-decorator]
def dispatch(ticket: int, total: int) -> None:
    if _redis().incr(DONE_KEY) == total:
        _redis().set(END_KEY, repr(time.time()))


def run_anchor(
    broker_url: str, env: dict[str, str], *, tickets: int, processes: int, concurrency: int
) -> dict[str, Any]:
    env = {**env, "BENCH_BROKER_URL": broker_url}
    args = [
        sys.executable, "-m", "celery", "-A", "bench.anchor", "worker",
        "--pool", "threads", "--concurrency", str(concurrency),
        "--queues", f"{QUEUE_A},{QUEUE_B}", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    workers = [Proc(f"anchor{i}", [*args, "-n", f"anchor{i}@%h"], env) for i in range(processes)]
    try:
        for worker in workers:
            worker.wait_log(b" ready.", timeout=60)
        client = redis.Redis.from_url(broker_url)
        client.delete(DONE_KEY, END_KEY)
        app.conf.broker_url = broker_url
        meter = CpuMeter(lambda: {"workers": [w.pid for w in workers]})
        meter.start()
        started = time.time()
        with app.producer_or_acquire() as producer:
            for i in range(tickets):
                app.send_task(
                    "bench.anchor.classify", args=[i, tickets], queue=QUEUE_A, producer=producer
                )
        sent = time.time()
        wait_until(lambda: client.get(END_KEY), 300, "anchor tickets done", every=0.05)
        ended = float(client.get(END_KEY) or 0)
        elapsed = ended - started
        cpu = meter.stop()
        return {
            "tickets": tickets,
            "processes": processes,
            "concurrency": concurrency,
            "send_seconds": round(sent - started, 3),
            "elapsed_seconds": round(elapsed, 3),
            "tickets_per_second": round(tickets / elapsed, 1),
            "cpu_ms_per_ticket": {k: round(v * 1000 / tickets, 2) for k, v in cpu.items()},
        }
    finally:
        for worker in workers:
            worker.stop()
