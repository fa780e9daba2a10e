"""When the SDK's spans and FastAPI's instrumentation are on: only where something can
record them."""

from __future__ import annotations

import pytest
from opentelemetry import metrics, trace

from triage.classify.backends.anthropic import make_client, sdk_tracing
from triage.ingest.app import web_telemetry


class _Provider(trace.TracerProvider):
    """Stands in for an OpenTelemetry SDK provider an application installed."""

    def get_tracer(self, *args: object, **kwargs: object) -> trace.Tracer:
        return trace.NoOpTracer()


class _Meters(metrics.NoOpMeterProvider):
    """Stands in for a meter provider an application installed."""


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for name in (
        "ANTHROPIC_OPEN_TELEMETRY",
        "FASTAPI_OTEL_AUTO_CONFIGURE",
        "OTEL_PYTHON_TRACER_PROVIDER",
        "OTEL_PYTHON_METER_PROVIDER",
        "OTEL_PYTHON_LOGGER_PROVIDER",
    ):
        monkeypatch.delenv(name, raising=False)


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


def test_no_provider_turns_fastapi_instrumentation_off():
    config = web_telemetry()
    assert config is not None
    assert not any(config[k] for k in ("tracing", "metrics", "logs", "operation_spans"))


def test_fastapi_keeps_its_defaults_when_a_tracer_is_installed(monkeypatch):
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: _Provider())
    assert web_telemetry() is None


def test_fastapi_keeps_its_defaults_when_only_a_meter_provider_is_installed(monkeypatch):
    monkeypatch.setattr(metrics, "get_meter_provider", lambda: _Meters())
    assert web_telemetry() is None
    # The SDK records spans only: a meter provider alone leaves its spans off.
    assert sdk_tracing() is False


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FASTAPI_OTEL_AUTO_CONFIGURE", "true"),
        ("OTEL_PYTHON_LOGGER_PROVIDER", "sdk_logger_provider"),
        ("OTEL_PYTHON_TRACER_PROVIDER", "sdk_tracer_provider"),
    ],
)
def test_the_environment_keeps_fastapi_defaults(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert web_telemetry() is None
