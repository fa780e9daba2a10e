"""The PostgreSQL pool is a hard limit that keeps its connections: many threads doing short
transactions share `pool_size` server backends, rather than opening (and closing) one per
burst. Overflow connections had cost PostgreSQL as much CPU as the work itself."""

from __future__ import annotations

import threading

from sqlalchemy import text

from triage.db.session import make_engine

THREADS = 16
ROUNDS = 25


def test_threads_share_the_pool_without_opening_more_backends(pg_url):
    engine = make_engine(pg_url, pool_size=3)
    backends: set[int] = set()
    most_at_once = 0
    in_use = 0
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        nonlocal in_use, most_at_once
        try:
            for _ in range(ROUNDS):
                with engine.begin() as conn:
                    with lock:
                        in_use += 1
                        most_at_once = max(most_at_once, in_use)
                    pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
                    # Long enough that the threads really do want more than three at once.
                    conn.execute(text("SELECT pg_sleep(0.002)"))
                    with lock:
                        in_use -= 1
                        backends.add(pid)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        engine.dispose()
    assert errors == []
    # Every round ran, no more than three at a time, on the same three backends throughout.
    assert most_at_once == 3
    assert len(backends) == 3
