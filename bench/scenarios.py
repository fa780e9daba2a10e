"""The triage scenarios: CPU-bound pipeline, ingestion, I/O-bound pipeline, per-ticket
overhead. Each one returns a plain dict of measured figures for the table and the JSON."""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.infra import (
    CpuMeter,
    FakeApi,
    FakeWatch,
    Proc,
    queue_aside,
    server_cpu_seconds,
    start_triage_workers,
    stop_all,
    wait_until,
    with_children,
)
from bench.load import percentile, post_closed_loop, post_open_loop, ticket_body
from bench.probe import Probe, summary
from triage.pipeline.routing import CLASSIFY_QUEUE

# After the workers say they are ready: their first sweep and the like.
BOOT_SETTLE_SECONDS = 1.0


@dataclass
class Stack:
    """What the scenarios share: the running API, the fake, the DB probe and the fleet shape."""

    env: dict[str, str]
    api_url: str
    fake: FakeApi
    probe: Probe
    processes: int
    concurrency: int
    workers: list[Proc] = field(default_factory=list)
    serve_pid: int = 0
    # Worker-only settings (e.g. a smaller DB pool for a fleet of many processes).
    worker_env: dict[str, str] = field(default_factory=dict)
    run: str = "r"
    _batch: int = 0

    @cached_property
    def postmaster(self) -> int:
        return self.probe.postmaster_pid()

    def bodies(self, n: int) -> list[bytes]:
        self._batch += 1
        tag = f"{self.run}{self._batch}"
        return [ticket_body(tag, i) for i in range(n)]

    def start_workers(self) -> None:
        if not self.workers:
            env = {**self.env, **self.worker_env}
            self.workers = start_triage_workers(env, self.processes, self.concurrency)

    def cpu_meter(self) -> CpuMeter:
        return CpuMeter(
            lambda: {
                "workers": [w.pid for w in self.workers],
                "api": with_children(self.serve_pid),
                # Not triage: the stand-in for the remote API, on the same two cores.
                "fake_api": [self.fake.proc.pid],
                # Not triage either: this process, which posts the webhooks (and polls).
                "load_generator": [os.getpid()],
            },
            # All of the server: backends come and go with pooled connections. Nothing else
            # uses it during a run.
            totals={"postgres": partial(server_cpu_seconds, self.postmaster)},
        )

    def batch_counts(self) -> Counter[str]:
        """Per stage, the ids and the task messages the running workers have handled so far
        (their `triage_batch_ids` histograms: `<stage>_ids`, `<stage>_messages`)."""
        counts: Counter[str] = Counter()
        for worker in self.workers:
            if worker.metrics_port is None:
                continue
            text = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5).text
            for family in text_string_to_metric_families(text):
                if family.name != "triage_batch_ids":
                    continue
                for sample in family.samples:
                    stage = sample.labels.get("stage", "")
                    if sample.name.endswith("_sum"):
                        counts[f"{stage}_ids"] += int(sample.value)
                    elif sample.name.endswith("_count"):
                        counts[f"{stage}_messages"] += int(sample.value)
        return counts

    def tickets_per_message(self, before: Counter[str]) -> dict[str, float]:
        """Mean ids per task message per stage since `before` (`batch_counts`), by the
        workers' own count."""
        now = self.batch_counts()
        stages = {key.rsplit("_", 1)[0] for key in now}
        return {
            stage: round(
                (now[f"{stage}_ids"] - before[f"{stage}_ids"])
                / max(1, now[f"{stage}_messages"] - before[f"{stage}_messages"]),
                1,
            )
            for stage in sorted(stages)
        }

    def stop_workers(self) -> None:
        stop_all(self.workers)
        self.workers = []


def _drain(stack: Stack, since: int, n: int, timeout: float, *, watch: bool = False) -> FakeWatch:
    """Poll until `n` tickets above `since` are finished; with `watch`, sample the fake's
    calls in flight and the workers' memory meanwhile."""
    seen = FakeWatch()
    deadline = time.monotonic() + timeout
    while True:
        if watch:
            seen.look(stack.fake, [worker.pid for worker in stack.workers])
        if stack.probe.done(since) >= n:
            return seen
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{n} tickets not finished after {timeout:.0f}s: {stack.probe.states(since)}"
            )
        time.sleep(0.1 if watch else 0.2)


def cpu_bound(stack: Stack, tickets: int) -> dict[str, Any]:
    """Model answers at once: the pipeline's own cost decides the rate, end to end."""
    stack.fake.set_latency(0.0)
    stack.fake.reset()
    stack.start_workers()
    since = stack.probe.watermark()
    batches = stack.batch_counts()
    bodies = stack.bodies(tickets)
    meter = stack.cpu_meter()
    meter.start()
    started = time.time()
    samples = post_closed_loop(stack.api_url, bodies, clients=32)
    posted = time.time()
    accepted = sum(1 for s in samples if s.status == 202)
    _drain(stack, since, accepted, timeout=240)
    cpu = meter.stop()
    times = stack.probe.times(since)
    ended = times["last_delivered"] or time.time()
    return {
        "tickets": tickets,
        "rejected_posts": sum(1 for s in samples if s.status != 202),
        "post_seconds": round(posted - started, 2),
        "elapsed_seconds": round(ended - started, 2),
        "tickets_per_second": round(accepted / (ended - started), 1),
        "states": stack.probe.states(since),
        "api_calls": stack.fake.stats()["calls"],
        "cpu_ms_per_ticket": {k: round(v * 1000 / accepted, 2) for k, v in cpu.items()},
        "tickets_per_message": stack.tickets_per_message(batches),
    }


def ingestion(stack: Stack, *, rate: float, seconds: float, max_tickets: int) -> dict[str, Any]:
    """The API alone (workers stopped; messages wait in Redis): a fixed offered rate, then
    as fast as 32 clients can post. Returns the tickets it left queued, for the I/O run."""
    stack.stop_workers()
    # Warm up first: connections, first-request imports and SQL compilation caches.
    warm = post_closed_loop(stack.api_url, stack.bodies(100), clients=8)
    meter = stack.cpu_meter()
    meter.start()
    fixed = post_open_loop(stack.api_url, stack.bodies(int(rate * seconds)), rate=rate)
    fixed_cpu = meter.stop()
    meter.start()
    started = time.perf_counter()
    flat_out = post_closed_loop(stack.api_url, stack.bodies(max_tickets), clients=32)
    flat_seconds = time.perf_counter() - started
    flat_cpu = meter.stop()

    def figures(samples: list[Any], cpu: dict[str, float]) -> dict[str, Any]:
        ms = [s.latency * 1000 for s in samples]
        return {
            "requests": len(samples),
            "non_202": sum(1 for s in samples if s.status != 202),
            "statuses": dict(Counter(s.status for s in samples)),
            "p50_ms": round(percentile(ms, 50), 1),
            "p99_ms": round(percentile(ms, 99), 1),
            "max_ms": round(max(ms), 1),
            # The API's own CPU is the figure that changes with its code; the rates move with
            # whatever else the machine is doing.
            "cpu_ms_per_request": {
                group: round(cpu[group] * 1000 / len(samples), 2)
                for group in ("api", "postgres", "load_generator")
            },
        }

    return {
        "fixed_rate": {
            "offered_per_second": rate,
            **figures(fixed, fixed_cpu),
            "max_start_lag_ms": round(max(s.lag for s in fixed) * 1000, 1),
        },
        "max_rate": {
            **figures(flat_out, flat_cpu),
            "clients": 32,
            "requests_per_second": round(len(flat_out) / flat_seconds, 1),
        },
        # Only accepted tickets wait in the queue (0 = no answer, e.g. a client timeout).
        "queued": sum(1 for s in [*warm, *fixed, *flat_out] if s.status == 202),
    }


def io_bound(
    stack: Stack, *, latency: float | tuple[float, float], preload: int, since: int
) -> dict[str, Any]:
    """Tickets already queued (posted while the workers were stopped); the workers start and
    drain them with the fake answering after `latency`. Measured from the fake's first call
    to the last delivery, so neither ingestion nor worker start-up is in the rate."""
    stack.stop_workers()
    stack.fake.set_latency(latency)
    stack.fake.reset()
    # The whole fleet boots before the first ticket is taken: booting workers are CPU-bound
    # (imports, connections) and, on a small machine, would slow the first ones' calls.
    with queue_aside(stack.env["REDIS_URL"], CLASSIFY_QUEUE):
        stack.start_workers()
        time.sleep(BOOT_SETTLE_SECONDS)
    batches = stack.batch_counts()
    meter = stack.cpu_meter()
    meter.start()
    seen = _drain(stack, since, preload, timeout=300, watch=True)
    cpu = meter.stop()
    times = stack.probe.times(since)
    stats = stack.fake.stats()
    first = seen.first_call or time.time()
    elapsed = (times["last_delivered"] or time.time()) - first
    mean_latency = sum(latency) / 2 if isinstance(latency, tuple) else latency
    in_flight_total = stack.processes * stack.concurrency
    ideal = in_flight_total / mean_latency
    rate = preload / elapsed
    return {
        "latency_seconds": latency,
        "tickets": preload,
        "threads_total": in_flight_total,
        "elapsed_seconds": round(elapsed, 2),
        "tickets_per_second": round(rate, 1),
        "ideal_per_second": round(ideal, 1),
        "fraction_of_ideal": round(rate / ideal, 3),
        "peak_in_flight": stats["peak_in_flight"],
        "mean_in_flight": seen.mean_in_flight(),
        "mean_model_ms": round(times["mean_model_ms"] or 0, 1),
        "api_calls": stats["calls"],
        "worker_rss_mib": [round(v, 1) for v in seen.rss.values()],
        "cpu_ms_per_ticket": {k: round(v * 1000 / preload, 2) for k, v in cpu.items()},
        # Cores our processes kept busy: near the machine's count means CPU, not
        # concurrency, set the rate.
        "cores_busy": round(sum(cpu.values()) / elapsed, 2),
        "tickets_per_message": stack.tickets_per_message(batches),
        "states": stack.probe.states(since),
    }


def preload(stack: Stack, tickets: int) -> tuple[int, int]:
    """Post `tickets` with the workers stopped; returns the watermark they sit above and how
    many were accepted."""
    stack.stop_workers()
    since = stack.probe.watermark()
    samples = post_closed_loop(stack.api_url, stack.bodies(tickets), clients=32)
    return since, sum(1 for s in samples if s.status == 202)


def overhead(stack: Stack, *, rate: float, seconds: float, latency: float) -> dict[str, Any]:
    """A steady offered rate (about half the measured peak) with the model at `latency`:
    per ticket, webhook commit to delivery minus the recorded model call."""
    stack.fake.set_latency(latency)
    stack.fake.reset()
    stack.start_workers()
    since = stack.probe.watermark()
    batches = stack.batch_counts()
    n = max(1, int(rate * seconds))
    meter = stack.cpu_meter()
    meter.start()
    samples = post_open_loop(stack.api_url, stack.bodies(n), rate=rate)
    accepted = sum(1 for s in samples if s.status == 202)
    _drain(stack, since, accepted, timeout=240)
    cpu = meter.stop()
    ms = [s.latency * 1000 for s in samples]
    times, slow = stack.probe.overhead_ms(since)
    return {
        "offered_per_second": round(rate, 1),
        "tickets": n,
        "model_latency_seconds": latency,
        **{
            f"overhead_ms{'' if part == 'total' else '_' + part}": summary(values)
            for part, values in times.items()
        },
        # Keys are seconds from the run's first ticket: a burst at the start, or spread out.
        "over_100ms_by_second": slow,
        "cpu_ms_per_ticket": {k: round(v * 1000 / max(1, accepted), 2) for k, v in cpu.items()},
        "tickets_per_message": stack.tickets_per_message(batches),
        "webhook_ms_meanwhile": {
            "p50": round(percentile(ms, 50), 1),
            "p99": round(percentile(ms, 99), 1),
        },
        "states": stack.probe.states(since),
    }


def wait_for_idle_fake(stack: Stack) -> None:
    wait_until(lambda: stack.fake.stats()["in_flight"] == 0, 30, "fake API idle")
