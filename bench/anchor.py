"""The anchor: a bare Celery two-hop pipeline on the same broker, pool and concurrency as
triage, with no database and no model call. Task A does nothing but send task B; B counts
completions in Redis. It is what a hand-written Celery task costs, and triage's CPU-bound
throughput is reported as a ratio to it.

The I/O-bound anchor (BENCH_CALL_MODEL set) is the same two hops with triage's model call in
task A: triage's own Anthropic backend, so the same request body through the same SDK client
set-up, against the same fake answering after 0.5 s. What it loses of the ideal is what
Celery, the threads and the call lose on this machine; what 3a loses beyond it is triage's
own bookkeeping (claims, the shared budget, labels, routing, the delivery hop).

The worker side runs as `celery -A bench.anchor worker` with BENCH_BROKER_URL set; the
Celery settings that change the cost per message (late ack, prefetch of one, JSON, no
results, no log line per message) are the ones triage uses, so the comparison is of the work,
not of the settings.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from celery.signals import after_setup_logger, worker_init

from bench.infra import CpuMeter, FakeApi, FakeWatch, Proc, queue_aside, wait_until
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
_backend: Any = None


def _quiet(**_: Any) -> None:
    quiet_per_message_logs("INFO")  # the anchor's workers run at INFO, as triage's do


after_setup_logger.connect(_quiet, weak=False)


def _redis() -> redis.Redis[bytes]:
    global _counter
    if _counter is None:
        _counter = redis.Redis.from_url(app.conf.broker_url)
    return _counter


def _build_backend(**_: Any) -> None:
    """Triage's backend, built once per process before the worker says it is ready (as
    triage's workers build theirs), so that the imports are not in the measured window."""
    global _backend
    if not os.environ.get("BENCH_CALL_MODEL"):
        return
    from triage.classify.backends.factory import build_backend
    from triage.config import load_config

    _backend = build_backend(load_config())


worker_init.connect(_build_backend, weak=False)


def _model_call() -> Callable[[int], Any] | None:
    """Triage's classify call for a ticket number, in a worker started with BENCH_CALL_MODEL;
    None in the CPU-bound anchor."""
    if _backend is None:
        return None
    from triage.classify.backends.base import ClassificationRequest

    backend = _backend
    return lambda ticket: backend.classify(
        ClassificationRequest(
            ticket_id=ticket,
            subject=f"Order {ticket} arrived damaged",
            body="The box was crushed and the mug inside is broken. Can I get a replacement?",
        )
    )


@app.task(name="bench.anchor.classify")  # type: ignore[untyped-decorator]
def classify(ticket: int, total: int) -> None:
    call = _model_call()
    if call is not None:
        call(ticket)
    app.send_task("bench.anchor.dispatch", args=[ticket, total], queue=QUEUE_B)


@app.task(name="bench.anchor.dispatch")  # type: ignore[untyped-decorator]
def dispatch(ticket: int, total: int) -> None:
    if _redis().incr(DONE_KEY) == total:
        _redis().set(END_KEY, repr(time.time()))


def _start_workers(
    workers: list[Proc], env: dict[str, str], processes: int, concurrency: int
) -> None:
    """Start the fleet into `workers` (the caller stops them, even if one never got ready)."""
    args = [
        sys.executable, "-m", "celery", "-A", "bench.anchor", "worker",
        "--pool", "threads", "--concurrency", str(concurrency),
        "--queues", f"{QUEUE_A},{QUEUE_B}", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    for i in range(processes):
        workers.append(Proc(f"anchor{i}", [*args, "-n", f"anchor{i}@%h"], env))
    for worker in workers:
        worker.wait_log(b" ready.", timeout=60)


def run_anchor(
    broker_url: str, env: dict[str, str], *, tickets: int, processes: int, concurrency: int
) -> dict[str, Any]:
    env = {**env, "BENCH_BROKER_URL": broker_url}
    workers: list[Proc] = []
    try:
        _start_workers(workers, env, processes, concurrency)
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


def run_io_anchor(
    broker_url: str,
    env: dict[str, str],
    fake: FakeApi,
    *,
    tickets: int,
    processes: int,
    concurrency: int,
    latency: float,
    settle_seconds: float,
) -> dict[str, Any]:
    """3a's conditions for the anchor with triage's call: `tickets` messages queued before
    the workers start, kept out of their reach until the whole fleet has booted, and the
    clock from the fake's first call to the last B, as 3a's."""
    env = {**env, "BENCH_BROKER_URL": broker_url, "BENCH_CALL_MODEL": "1"}
    client = redis.Redis.from_url(broker_url)
    client.delete(DONE_KEY, END_KEY, QUEUE_A)
    app.conf.broker_url = broker_url
    with app.producer_or_acquire() as producer:
        for i in range(tickets):
            app.send_task(
                "bench.anchor.classify", args=[i, tickets], queue=QUEUE_A, producer=producer
            )
    fake.set_latency(latency)
    fake.reset()
    workers: list[Proc] = []
    try:
        with queue_aside(broker_url, QUEUE_A):
            _start_workers(workers, env, processes, concurrency)
            time.sleep(settle_seconds)
        meter = CpuMeter(lambda: {"workers": [w.pid for w in workers], "fake_api": [fake.proc.pid]})
        meter.start()
        seen = FakeWatch()
        deadline = time.monotonic() + 300
        while not client.get(END_KEY):
            seen.look(fake, [worker.pid for worker in workers])
            if time.monotonic() > deadline:
                done = int(client.get(DONE_KEY) or 0)
                raise TimeoutError(f"I/O anchor: {done} of {tickets} done")
            time.sleep(0.1)
        cpu = meter.stop()
        ended = float(client.get(END_KEY) or 0)
        elapsed = ended - (seen.first_call or ended)
        stats = fake.stats()
        ideal = processes * concurrency / latency
        return {
            "latency_seconds": latency,
            "tickets": tickets,
            "elapsed_seconds": round(elapsed, 2),
            "tickets_per_second": round(tickets / elapsed, 1),
            "ideal_per_second": round(ideal, 1),
            "fraction_of_ideal": round(tickets / elapsed / ideal, 3),
            "peak_in_flight": stats["peak_in_flight"],
            "mean_in_flight": seen.mean_in_flight(),
            "api_calls": stats["calls"],
            "worker_rss_mib": [round(v, 1) for v in seen.rss.values()],
            "cpu_ms_per_ticket": {k: round(v * 1000 / tickets, 2) for k, v in cpu.items()},
            "cores_busy": round(sum(cpu.values()) / elapsed, 2) if elapsed > 0 else None,
        }
    finally:
        for worker in workers:
            worker.stop()
        client.delete(QUEUE_A)
        client.close()
