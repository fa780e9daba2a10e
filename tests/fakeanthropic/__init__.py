"""The project's fake Anthropic Messages API (see server.py)."""

from tests.fakeanthropic.faults import KINDS, Fault
from tests.fakeanthropic.server import FakeAnthropic, Recorded

__all__ = ["KINDS", "FakeAnthropic", "Fault", "Recorded"]
