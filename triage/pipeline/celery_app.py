"""The Celery application and the reasons behind each setting."""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

from celery import Celery
from kombu import Queue

from triage.config import AppConfig
from triage.pipeline import consumption
from triage.pipeline.routing import CLASSIFY_QUEUE, DEAD_QUEUE, REVIEW_QUEUE, department_queue
from triage.reliability.retry import classify_lease_seconds

# Redis redelivers a message that is still unacked after the visibility timeout, and an
# unacked message is one being run (acks_late) or one waiting on a worker for its countdown.
# So it must exceed the longest task (the classify lease: four calls of at most the API
# timeout, `retry.classify_lease_seconds`) plus the longest countdown the broker carries
# (`relay.MAX_BROKER_COUNTDOWN_SECONDS`; longer delays wait in the outbox), or healthy tasks
# would run twice. It is also how long a message held by a SIGKILLed worker stays invisible;
# the sweeper recovers those tickets from the database long before.
VISIBILITY_TIMEOUT_SECONDS = 2 * 3600
# Warm shutdown (SIGTERM) finishes the tasks in flight: the longest is the classify lease
# with the default 30 s API timeout. Whatever is still running after this is requeued.
SOFT_SHUTDOWN_SECONDS = 180.0


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
            # kombu emulates message priorities with a list per queue per step (four by
            # default), and every poll's BRPOP names them all: 40 keys for triage's ten
            # queues, rebuilt and sent by the consumer loop each time round. Triage never
            # publishes with a priority, so every message is in the first list anyway.
            "priority_steps": [0],
        },
        # Publishing is done by the outbox relay, which has its own recovery; a publish that
        # blocks retrying inside a web request or task would only hold a thread.
        task_publish_retry=False,
        task_default_queue=CLASSIFY_QUEUE,
        task_queues=[Queue(name) for name in [*all_queues(config), DEAD_QUEUE]],
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        # Time limits: Celery enforces these in the prefork pool only (signals); in the thread
        # pool a thread cannot be killed, so there the API timeout bounds each call and the
        # classify lease bounds the task (a holder past it is presumed dead and taken over).
        # Set anyway, for anyone running -P prefork: soft first so the stage can record the
        # failure, hard a little later.
        task_soft_time_limit=classify_lease_seconds(config.settings),
        task_time_limit=classify_lease_seconds(config.settings) + 30,
        # SIGTERM: stop taking messages, let the tasks in flight finish (up to this long),
        # then requeue the unacked rest instead of leaving them to the visibility timeout.
        worker_soft_shutdown_timeout=SOFT_SHUTDOWN_SECONDS,
        worker_send_task_events=False,
        enable_utc=True,
    )
    url = urlsplit(broker)
    if url.scheme in ("redis", "rediss"):
        # Over TLS too: the transport's reconnect fix matters most where connections drop.
        app.conf.broker_transport = "triage.pipeline.redis_transport:Transport"
    if url.scheme == "rediss" and "ssl_cert_reqs=" not in url.query:
        # kombu's own default for rediss:// is CERT_NONE: encrypted, but to whoever answers.
        # Verify the server as redis-py does (the limits client, on the same URL); a URL's
        # `?ssl_cert_reqs=none` still opts out.
        app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    consumption.install(app)
    return app
