"""Per-process singletons: config, the session factory, the Celery app, the publisher, and the
classification backend. Built once, on first use, and shared by every thread."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import cached_property, lru_cache

import redis
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from triage.classify.backends.base import ClassifierBackend
from triage.classify.backends.factory import build_backend
from triage.config import AppConfig, Settings, get_config
from triage.db.session import get_sessionmaker
from triage.pipeline.broker import QueueDepth
from triage.pipeline.celery_app import make_celery
from triage.pipeline.fanout import CallPool, call_pool
from triage.pipeline.publishing import Backlog, PublishBatcher
from triage.pipeline.relay import Pending, Publisher
from triage.pipeline.routing import CLASSIFY_QUEUE
from triage.reliability.limits import Admission, ApiLimiter, CircuitBreaker, Limits
from triage.sinks.base import Sink
from triage.sinks.registry import SinkTable, load_sinks


class Runtime:
    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self._backend: ClassifierBackend | None = None
        self._backend_lock = threading.Lock()
        self._batcher: PublishBatcher | None = None

    @property
    def settings(self) -> Settings:
        return self.config.settings

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        settings = self.config.settings
        return get_sessionmaker(settings.database_url, settings.db_pool_size)

    @cached_property
    def celery(self) -> Celery:
        app = make_celery(self.config)
        app.set_default()
        return app

    @cached_property
    def publisher(self) -> Publisher:
        return Publisher(self.sessions, self.celery.send_task, self.settings.batch_size)

    def start_batching(self, *, gather_stream: bool = False) -> None:
        """From now on `publish_after_commit` hands rows to one background thread, which
        publishes what piles up together (long-running processes: the API and workers).
        `gather_stream`: a steady stream of ids close together waits a moment to share
        messages too (see publishing.LINGER_SECONDS)."""
        if self._batcher is None:
            classify_backlog = Backlog(QueueDepth(self.celery, CLASSIFY_QUEUE))
            self._batcher = PublishBatcher(
                self.publisher, backlog=classify_backlog, gather_stream=gather_stream
            )
            self._batcher.start()

    def stop_batching(self) -> None:
        """Publish what was handed over, then publish inline again."""
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.stop()

    def publish_after_commit(self, rows: Sequence[Pending]) -> None:
        """Send rows the caller has just committed (written with `publisher.write`): through
        the batching thread when one runs, else now."""
        batcher = self._batcher
        if batcher is not None:
            batcher.submit(rows)
        else:
            self.publisher.publish_written(rows)

    @cached_property
    def calls(self) -> CallPool:
        """Model calls in flight in this process, at most `worker_concurrency`."""
        return call_pool(self.settings, self.settings.worker_concurrency)

    @cached_property
    def sinks(self) -> SinkTable:
        return load_sinks(self.config)

    def sinks_for(self, department: str | None) -> Sequence[Sink]:
        return self.sinks.for_department(department)

    @cached_property
    def admission(self) -> Admission | None:
        """Shared rate limit and circuit breaker, for backends that call the API."""
        settings = self.settings
        url = settings.limits_redis_url()
        if settings.effective_backend() == "local" or url is None:
            return None
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        limiter = ApiLimiter(
            client,
            Limits(settings.api_calls_per_minute, settings.api_input_tokens_per_minute),
        )
        breaker = CircuitBreaker(
            client,
            threshold=settings.circuit_threshold,
            window=settings.circuit_window_seconds,
            cooldown=settings.circuit_cooldown_seconds,
            auth_cooldown=settings.circuit_auth_cooldown_seconds,
        )
        return Admission(limiter, breaker)

    @property
    def backend(self) -> ClassifierBackend:
        # Built lazily and once: the local backend trains at construction, the API backend
        # opens a connection pool; neither should happen per ticket or per thread.
        if self._backend is None:
            with self._backend_lock:
                if self._backend is None:
                    self._backend = build_backend(self.config)
        return self._backend


@lru_cache(maxsize=1)
def get_runtime() -> Runtime:
    return Runtime(get_config())
