"""Builds the configured backend (TRIAGE_BACKEND: auto | anthropic | local | cascade)."""

from __future__ import annotations

from triage.classify.backends.base import ClassifierBackend
from triage.config import AppConfig
from triage.errors import ConfigError


def build_backend(config: AppConfig) -> ClassifierBackend:
    settings = config.settings
    kind = settings.effective_backend()
    if kind == "local":
        from triage.classify.backends.local import LocalBackend

        local: ClassifierBackend = LocalBackend(config.taxonomy, config_dir=settings.config_dir)
        return local
    primary = _anthropic(config, settings.model)
    # The same model asked again is a second paid call for the same answer, not a second
    # opinion: unsure tickets go to review as they would without escalation.
    if kind == "anthropic" or settings.escalation_model in (None, "", settings.model):
        return primary
    from triage.classify.backends.cascade import CascadeBackend

    return CascadeBackend(
        primary,
        _anthropic(config, settings.escalation_model),
        escalate_below=config.taxonomy.routing.escalate_below_confidence,
    )


def _anthropic(config: AppConfig, model: str) -> ClassifierBackend:
    from triage.classify.backends.anthropic import AnthropicBackend, ThreadClients

    settings = config.settings
    if settings.anthropic_api_key is None:
        raise ConfigError("ANTHROPIC_API_KEY is not set; use TRIAGE_BACKEND=local to run offline")
    client = ThreadClients(
        api_key=settings.anthropic_api_key.get_secret_value(),
        base_url=settings.anthropic_base_url,
        timeout=settings.api_timeout_seconds,
    )
    return AnthropicBackend(
        taxonomy=config.taxonomy,
        model=model,
        spec=config.models.spec(model),
        client=client,
        max_tokens=settings.max_tokens,
    )
