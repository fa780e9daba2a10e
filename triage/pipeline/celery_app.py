"""The Celery application and the reasons behind each setting."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from triage.config import AppConfig
from triage.pipeline.routing import CLASSIFY_QUEUE, DEAD_QUEUE, REVIEW_QUEUE, department_queue

# Longest a task may run (API timeout x repair call + DB work) is well under this. Redis
# redelivers an unacked message after the visibility timeout, so it must exceed the longest
# task and the longest retry countdown, or healthy tasks would run twice.
VISIBILITY_TIMEOUT_SECONDS = 2 * 3600


def all_queues(config: AppConfig) -> list[str]:
    depts = [department_queue(d) for d in config.taxonomy.department_names]
    return [CLASSIFY_QUEUE, REVIEW_QUEUE, *depts]


def make_celery(config: AppConfig) -> Celery:
    broker = config.settings.effective_broker_url()
    if not broker:
        raise RuntimeError("no broker: set REDIS_URL or TRIAGE_BROKER_URL (or use `triage run`)")
    app = Celery("triage", broker=broker, include=["triage.pipeline.tasks"])
    app.conf.update(
        # The database records outcomes; a result backend would only duplicate it.
        task_ignore_result=True,
        # Ack after the task finishes, so a worker killed mid-call leaves the message to be
        # redelivered; tasks are idempotent, so running twice has one effect.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message per free thread: long I/O-bound tasks must not sit prefetched behind a
        # busy thread while another worker is idle.
        worker_prefetch_multiplier=1,
        # On broker connection loss the unacked messages come back anyway; cancel their tasks
        # rather than finish work whose ack can no longer be delivered.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": VISIBILITY_TIMEOUT_SECONDS,
            # Fail fast on a dead broker; the outbox keeps the message until it is back.
            "socket_connect_timeout": 5,
            "socket_timeout": 10,
        },
        # Publishing is done by the outbox relay, which has its own recovery; a publish that
        # blocks retrying inside a web request or task would only hold a thread.
        task_publish_retry=False,
        task_default_queue=CLASSIFY_QUEUE,
        task_queues=[Queue(name) for name in [*all_queues(config), DEAD_QUEUE]],
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        # Thread pool tasks have no hard time limit (Celery enforces those with signals in the
        # prefork pool only); the API call carries its own timeout instead.
        worker_send_task_events=False,
        enable_utc=True,
    )
    return app
