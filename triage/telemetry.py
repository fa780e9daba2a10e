"""Whether anything in this process records OpenTelemetry data.

The anthropic SDK and FastAPI both instrument every call or request when OpenTelemetry's API
is importable, and only find out afterwards, per call, that no provider records anything.
Triage turns their instrumentation off when nothing was installed at startup, and leaves it
to them when something was: a provider set by the application or by
`opentelemetry-instrument`, or one named in the environment.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import _logs, metrics, trace

# OpenTelemetry's API has no public "is a provider installed" query. These are the
# placeholders its getters return until one is; any other provider records something.
_PLACEHOLDERS = frozenset(
    {
        ("opentelemetry.trace", "ProxyTracerProvider"),
        ("opentelemetry.metrics._internal", "_ProxyMeterProvider"),
        ("opentelemetry._logs._internal", "ProxyLoggerProvider"),
    }
)


def _installed(provider: Any) -> bool:
    cls = type(provider)
    return (cls.__module__, cls.__name__) not in _PLACEHOLDERS


def tracer_installed() -> bool:
    """A tracer provider is installed, or the environment names one."""
    if os.environ.get("OTEL_PYTHON_TRACER_PROVIDER"):
        return True
    return _installed(trace.get_tracer_provider())


def any_provider_installed() -> bool:
    """A tracer, meter or logger provider is installed, or the environment names one."""
    if any(
        os.environ.get(f"OTEL_PYTHON_{kind}_PROVIDER") for kind in ("TRACER", "METER", "LOGGER")
    ):
        return True
    return (
        _installed(trace.get_tracer_provider())
        or _installed(metrics.get_meter_provider())
        or _installed(_logs.get_logger_provider())
    )
