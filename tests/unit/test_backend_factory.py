"""Which backend the settings build."""

from __future__ import annotations

from triage.classify.backends.anthropic import AnthropicBackend
from triage.classify.backends.cascade import CascadeBackend
from triage.classify.backends.factory import build_backend
from triage.config import Settings, load_config


def _settings(**overrides: object) -> Settings:
    fields: dict[str, object] = {
        "anthropic_api_key": "sk-test",
        "anthropic_base_url": "http://127.0.0.1:9",
        "backend": "cascade",
    }
    fields.update(overrides)
    return Settings(**fields)  # type: ignore[arg-type]


def test_cascade_escalates_to_the_escalation_model():
    backend = build_backend(load_config(_settings()))
    assert isinstance(backend, CascadeBackend)
    assert backend.models == {"claude-haiku-4-5", "claude-sonnet-5"}


def test_an_escalation_model_that_is_the_model_itself_is_no_escalation():
    # Asking the same model again paid a second call per unsure ticket for the same answer.
    settings = _settings(model="claude-sonnet-5", escalation_model="claude-sonnet-5")
    backend = build_backend(load_config(settings))
    assert isinstance(backend, AnthropicBackend) and backend.model == "claude-sonnet-5"
