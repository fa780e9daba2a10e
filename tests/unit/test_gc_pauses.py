"""Freezing start-up objects: what is in use leaves the collector's generations, what is
garbage is freed first."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from triage.gc_pauses import freeze_startup_objects


class _Node:
    other: object = None


@pytest.fixture
def thawed() -> Iterator[None]:
    # The test process must not keep its heap frozen for the tests after this one.
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_objects_in_use_are_frozen_out_of_the_collectors_generations(thawed):
    held = [_Node()]
    assert any(obj is held for obj in gc.get_objects())

    frozen = freeze_startup_objects("test")

    # Frozen objects may still be freed (their last reference dropped) but none are added.
    assert 0 < gc.get_freeze_count() <= frozen
    assert not any(obj is held for obj in gc.get_objects())
    # Objects made afterwards are the collector's again.
    later = [_Node()]
    assert any(obj is later for obj in gc.get_objects())


def test_start_up_garbage_is_collected_not_frozen(thawed):
    cycle = _Node()
    cycle.other = cycle  # only the cyclic collector can free it
    gone = weakref.ref(cycle)
    del cycle

    freeze_startup_objects("test")

    assert gone() is None
