"""When the SDK's OpenTelemetry spans are on: only where something can record them."""

from __future__ import annotations

import pytest
from opentelemetry import trace

from triage.classify.backends.anthropic import make_client, sdk_tracing


class _Provider(trace.TracerProvider):
    """Stands in for an OpenTelemetry SDK provider an application installed."""

    def get_tracer(self, *args: object, **kwargs: object) -> trace.Tracer:
        return trace.NoOpTracer()


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_OPEN_TELEMETRY", raising=False)
    monkeypatch.delenv("OTEL_PYTHON_TRACER_PROVIDER", raising=False)


def test_no_tracer_provider_means_no_spans():
    assert sdk_tracing() is False
    client = make_client(api_key="sk-test", base_url="http://127.0.0.1:9", timeout=1)
    assert client.open_telemetry["traces"]["enabled"] is False


def test_an_installed_provider_leaves_spans_to_the_sdk(monkeypatch):
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: _Provider())
    assert sdk_tracing() is None
    client = make_client(api_key="sk-test", base_url="http://127.0.0.1:9", timeout=1)
    assert client.open_telemetry["traces"]["enabled"] is True


@pytest.mark.parametrize(
    ("name", "value"),
    [("ANTHROPIC_OPEN_TELEMETRY", "true"), ("OTEL_PYTHON_TRACER_PROVIDER", "sdk_tracer_provider")],
)
def test_the_environment_still_decides_when_it_says(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert sdk_tracing() is None
