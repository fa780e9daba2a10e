"""Short pauses for the garbage collector's full passes in long-running processes.

By the time a worker takes its first message the collector tracks some 280,000 objects (Celery,
SQLAlchemy, pydantic and the SDK imported; config, pools and clients built) that live as long as
the process. CPython's full collection (generation 2) walks every one of them while it holds the
GIL, so all of a worker's threads stand still for it: 150-490 ms a pass on the 2-core bench
machine, about every half minute under load. Those passes were the steps in the tail of a ticket's
time in triage (bench/RESULTS.md, session 18).

`gc.freeze()` once start-up is over moves those objects to a permanent generation that no
collection looks at again; objects made later are collected as before. Start-up garbage is
collected first, so what is frozen is what is still in use.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_startup_objects(process: str) -> int:
    """Collect, then freeze every object the process holds now; returns how many are frozen.
    Call once start-up is done (a worker ready, the API's lifespan begun)."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info(
        "%s: %d start-up objects frozen; full garbage collections no longer walk them",
        process,
        frozen,
    )
    return frozen
