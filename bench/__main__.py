"""`make bench`: the anchor and the triage scenarios side by side, in one run of a few minutes.

PostgreSQL and Redis are the machine's (a database created and dropped per run, a leased
Redis database); the fake Messages API, `triage serve` and the workers are child processes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import scenarios
from bench.anchor import run_anchor, run_io_anchor
from bench.calibrate import machine_speed
from bench.infra import (
    BenchDatabase,
    FakeApi,
    RedisLease,
    dump_json,
    machine,
    start_serve,
    triage_env,
)
from bench.probe import Probe
from bench.report import print_table
from triage.config import PROJECT_ROOT

console = Console()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    # Four processes of 64 threads: 256 calls can be in flight, both cores are used despite the
    # GIL, and a small pool each keeps PostgreSQL well under its 100 connections.
    parser.add_argument("--processes", type=int, default=4, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=64, help="threads per worker")
    parser.add_argument(
        "--db-pool", type=int, default=8, help="workers' TRIAGE_DB_POOL_SIZE (0: triage's default)"
    )
    parser.add_argument("--api-workers", type=int, default=1, help="triage serve --workers")
    # Off by default, as in a fresh install; a production fleet sets its tier's limits, and
    # then every batch asks the shared budget in Redis before its calls.
    parser.add_argument(
        "--calls-per-minute", type=int, default=0, help="workers' TRIAGE_API_CALLS_PER_MINUTE"
    )
    parser.add_argument(
        "--tokens-per-minute",
        type=int,
        default=0,
        help="workers' TRIAGE_API_INPUT_TOKENS_PER_MINUTE",
    )
    parser.add_argument(
        "--batch-size", type=int, default=0, help="TRIAGE_BATCH_SIZE (0: triage's default)"
    )
    parser.add_argument("--tickets", type=int, default=1500, help="anchor and CPU-bound tickets")
    parser.add_argument("--ingest-rate", type=float, default=200.0, help="offered req/s")
    parser.add_argument("--ingest-seconds", type=float, default=10.0)
    parser.add_argument("--ingest-max-tickets", type=int, default=600, help="max-rate posts")
    parser.add_argument("--random-tickets", type=int, default=1200, help="0.2-2 s variant")
    parser.add_argument(
        "--budget", type=float, default=540, help="seconds; later scenarios are skipped past it"
    )
    parser.add_argument("--overhead-seconds", type=float, default=15.0)
    parser.add_argument(
        "--overhead-rate", type=float, default=0.0, help="tickets/s (0: half the measured peak)"
    )
    parser.add_argument(
        "--only", default="", help="comma-separated subset: anchor,cpu,ingest,io,random,overhead"
    )
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "var" / "bench")
    return parser.parse_args()


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    """Settings for the workers alone."""
    env: dict[str, str] = {}
    if args.db_pool:
        env["TRIAGE_DB_POOL_SIZE"] = str(args.db_pool)
    if args.calls_per_minute:
        env["TRIAGE_API_CALLS_PER_MINUTE"] = str(args.calls_per_minute)
    if args.tokens_per_minute:
        env["TRIAGE_API_INPUT_TOKENS_PER_MINUTE"] = str(args.tokens_per_minute)
    return env


def main() -> None:
    # A bench stopped with SIGTERM (kill, a CI timeout) stops its child processes too: the
    # handler turns the signal into SystemExit, so the `finally` below runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args()
    only = set(filter(None, args.only.split(",")))

    def wanted(name: str) -> bool:
        return not only or name in only

    started = time.monotonic()
    result: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "fleet": {
            "processes": args.processes,
            "concurrency": args.concurrency,
            "db_pool_size": args.db_pool or "default",
            "api_calls_per_minute": args.calls_per_minute,
            "api_input_tokens_per_minute": args.tokens_per_minute,
            "api_workers": args.api_workers,
            "batch_size": args.batch_size or "default",
        },
        "notes": [],
    }
    with BenchDatabase() as db, RedisLease() as lease:
        # Before any process of the run starts: nothing else competes for the cores.
        result["machine"]["speed"] = machine_speed(lease.url)
        fake = FakeApi(triage_env(db.url, lease.url, ""))
        batching = {"TRIAGE_BATCH_SIZE": str(args.batch_size)} if args.batch_size else {}
        env = triage_env(db.url, lease.url, fake.base_url, **batching)
        serve, api_url = start_serve(env, args.api_workers)
        probe = Probe(db.url)
        stack = scenarios.Stack(
            env=env,
            api_url=api_url,
            fake=fake,
            probe=probe,
            processes=args.processes,
            concurrency=args.concurrency,
            run=uuid.uuid4().hex[:6],
            serve_pid=serve.pid,
            worker_env=worker_env(args),
        )
        try:
            run_scenarios(started, args, stack, lease.url, result, wanted)
        finally:
            stack.stop_workers()
            serve.stop()
            fake.stop()
            probe.dispose()
    result["bench_seconds"] = round(time.monotonic() - started, 1)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"{stamp}.json"
    dump_json(path, result)
    print_table(result, console)
    dump_json(path, result)  # again, with the ratios the table derived
    console.print(f"bench took {result['bench_seconds']} s; JSON in {path}")


def run_scenarios(
    started: float,
    args: argparse.Namespace,
    stack: scenarios.Stack,
    broker_url: str,
    result: dict[str, Any],
    wanted: Any,
) -> None:
    def measure(key: str, title: str, fn: Any) -> None:
        """Run one scenario; a failure is reported with the others, not instead of them."""
        spent = time.monotonic() - started
        if spent > args.budget:
            console.log(
                f"[yellow]{title} skipped: {spent:.0f} s spent of a {args.budget:.0f} s budget"
            )
            result.setdefault("skipped", []).append(key)
            return
        console.log(f"[bold]{title}[/]")
        began = time.monotonic()
        try:
            result[key] = fn()
        except Exception as exc:
            console.log(f"[red]{title} failed: {exc}[/]")
            # Where it failed, too: a bare "Connection refused" does not say to what.
            where = traceback.format_exception(exc)[-6:]
            result.setdefault("errors", {})[key] = f"{exc.__class__.__name__}: {exc}"
            result.setdefault("error_tracebacks", {})[key] = "".join(where)
        load = os.getloadavg()[0]
        result.setdefault("load_average_after", {})[key] = round(load, 2)
        console.log(f"  {time.monotonic() - began:.0f} s; load average {load:.1f}")

    if wanted("anchor"):
        measure(
            "anchor",
            "1. anchor: bare Celery two-hop",
            lambda: run_anchor(
                broker_url,
                stack.env,
                tickets=args.tickets,
                processes=args.processes,
                concurrency=args.concurrency,
            ),
        )
    if wanted("cpu"):
        measure(
            "cpu_bound",
            "2. triage CPU-bound, end to end",
            lambda: scenarios.cpu_bound(stack, args.tickets),
        )
    if wanted("ingest") or wanted("io"):
        since = stack.probe.watermark()
        measure(
            "ingestion",
            "4. ingestion (API alone; what it accepts is 3a's queue)",
            lambda: scenarios.ingestion(
                stack,
                rate=args.ingest_rate,
                seconds=args.ingest_seconds,
                max_tickets=args.ingest_max_tickets,
            ),
        )
        queued = result.get("ingestion", {}).get("queued", 0)
        if wanted("io") and queued:
            # The same tickets, latency and fleet through the bare two hops with triage's call.
            measure(
                "io_anchor",
                f"3a (anchor). bare Celery two-hop with triage's call at 0.5 s, {queued} queued",
                lambda: run_io_anchor(
                    broker_url,
                    stack.env,
                    stack.fake,
                    tickets=queued,
                    processes=args.processes,
                    concurrency=args.concurrency,
                    latency=0.5,
                    settle_seconds=scenarios.BOOT_SETTLE_SECONDS,
                ),
            )
            measure(
                "io_fixed",
                f"3a. I/O-bound at 0.5 s, {queued} queued tickets",
                lambda: scenarios.io_bound(stack, latency=0.5, preload=queued, since=since),
            )
    if wanted("random"):

        def random_latency() -> dict[str, Any]:
            since, accepted = scenarios.preload(stack, args.random_tickets)
            return scenarios.io_bound(stack, latency=(0.2, 2.0), preload=accepted, since=since)

        measure("io_random", "3b. I/O-bound at 0.2-2 s", random_latency)
    if wanted("overhead"):
        peaks = [
            r["tickets_per_second"] for r in (result.get("io_fixed"), result.get("cpu_bound")) if r
        ]
        rate = args.overhead_rate or (max(5.0, min(peaks) / 2) if peaks else 40.0)
        measure(
            "overhead",
            f"5. per-ticket overhead at {rate:.0f} tickets/s",
            lambda: scenarios.overhead(
                stack, rate=rate, seconds=args.overhead_seconds, latency=0.5
            ),
        )
        # Half of that too: where the knee is. A steady trickle of webhooks makes one-ticket
        # messages, which cost several times a batch's share per ticket.
        measure(
            "overhead_quarter",
            f"5b. per-ticket overhead at {rate / 2:.0f} tickets/s",
            lambda: scenarios.overhead(
                stack, rate=rate / 2, seconds=args.overhead_seconds, latency=0.5
            ),
        )


if __name__ == "__main__":
    main()
