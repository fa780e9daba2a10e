"""`triage serve` and `triage worker`: the two long-running processes."""

from __future__ import annotations

import os
import socket

import typer

from triage.cli.common import EXIT_USAGE, fail, guarded
from triage.db.migrate import require_current_schema
from triage.ingest.multiprocess_metrics import shared_metrics_dir

app = typer.Typer()


@app.command()
@guarded
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on."),
    workers: int = typer.Option(1, help="Uvicorn worker processes."),
) -> None:
    """Run the webhook API.

    Example: triage serve --host 0.0.0.0 --port 8000
    """
    import uvicorn

    from triage.ingest.app import create_app, log_to_stderr
    from triage.pipeline.runtime import get_runtime

    log_to_stderr()
    rt = get_runtime()
    # Fail at start-up, not on the first webhook: schema behind the code, or no broker config.
    require_current_schema(rt.settings.database_url)
    rt.celery  # noqa: B018
    # Warnings and errors only: uvicorn's access log (INFO) prints every request's path and
    # query, which for django-helpdesk hold the webhook secret.
    if workers > 1:
        with shared_metrics_dir():
            uvicorn.run(
                "triage.ingest.asgi:app",
                host=host,
                port=port,
                workers=workers,
                log_level="warning",
            )
    else:
        uvicorn.run(create_app(freeze_gc=True), host=host, port=port, log_level="warning")


@app.command()
@guarded
def worker(
    concurrency: int = typer.Option(
        0,
        "--concurrency",
        "-c",
        min=0,
        help="Model calls in flight (and task threads). Default: TRIAGE_WORKER_CONCURRENCY.",
        show_default=False,
    ),
    queues: str = typer.Option(
        "", "--queues", "-Q", help="Comma-separated queues. Default: classify, review, every dept."
    ),
    loglevel: str = typer.Option("INFO", help="Celery log level."),
) -> None:
    """Run a Celery worker (thread pool) plus the sweeper that recovers stuck work.

    Example: triage worker -c 200 -Q triage.classify
    """
    from celery.signals import after_setup_logger, worker_ready

    from triage.gc_pauses import freeze_startup_objects
    from triage.pipeline import tasks  # noqa: F401 - registers the tasks
    from triage.pipeline.celery_app import all_queues
    from triage.pipeline.fanout import call_pool
    from triage.pipeline.runtime import get_runtime
    from triage.pipeline.worker_logs import content_free_task_failures, quiet_per_message_logs
    from triage.reliability.sweeper import Periodic, sweep_once

    rt = get_runtime()
    settings = rt.settings
    consumed = _queues(queues, all_queues(rt.config))
    # sinks.yaml and the secrets it names: a mistake there stops start-up, not each delivery.
    rt.sinks  # noqa: B018
    threads = concurrency or settings.worker_concurrency
    rt.calls = call_pool(settings, threads)
    require_current_schema(settings.database_url)
    rt.backend  # noqa: B018 - train/connect once before taking messages
    sweeper = Periodic("triage-sweeper", settings.sweep_interval_seconds, lambda: sweep_once(rt))
    sweeper.start()
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port)
    argv = [
        "worker",
        # Classification waits on the network; threads overlap those waits. The prefork pool
        # would need a process per in-flight call.
        "--pool",
        "threads",
        "--concurrency",
        str(threads),
        "--queues",
        ",".join(consumed),
        "--hostname",
        f"triage-{os.getpid()}@{socket.gethostname()}",
        "--loglevel",
        loglevel,
        # Gossip, mingle and heartbeats are chatter we do not use; they cost broker round trips.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]

    def _after_logging_setup(**_: object) -> None:
        quiet_per_message_logs(loglevel)
        content_free_task_failures()

    after_setup_logger.connect(_after_logging_setup, weak=False)

    def _after_startup(**_: object) -> None:
        freeze_startup_objects("worker")

    worker_ready.connect(_after_startup, weak=False)

    # Deliveries from many classify batches finishing together share publishes and messages.
    rt.start_batching()
    try:
        rt.celery.worker_main(argv)
    finally:
        sweeper.stop()
        rt.stop_batching()


def _queues(option: str, known: list[str]) -> list[str]:
    """The queues named by --queues (all of triage's when empty). A name triage never publishes
    to is a usage error: a worker started on `-Q triage.clasify` would wait politely for ever
    while the real queue backs up."""
    if not option:
        return known
    chosen = [name.strip() for name in option.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        fail(
            f"--queues {option!r}: {', '.join(unknown) or 'no queue'} is not a triage queue "
            f"(one of {', '.join(known)})",
            EXIT_USAGE,
        )
    return chosen
