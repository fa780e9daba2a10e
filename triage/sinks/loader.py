"""config/sinks.yaml: which sinks each department's tickets go through.

The file is optional (see config/sinks.example.yaml). Secrets are not written in it: each
`*_env` field names the environment variable that holds one, read once at start-up.
Sink names in `departments` / `default`: `helpdesk` (write back to the ticket's source),
`webhook:<name>` (a configured outbound webhook) or `queue` (the dept.<name> message only).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import httpx
from pydantic import AfterValidator, Field, ValidationError

from triage.config import AppConfig, load_yaml_text, read_config_text
from triage.errors import ConfigError
from triage.sinks.base import Sink
from triage.sinks.django_helpdesk import DjangoHelpdeskWriter
from triage.sinks.freshdesk import FreshdeskWriter
from triage.sinks.helpdesk import HelpdeskWriteBack, possible_tags
from triage.sinks.registry import SinkTable
from triage.sinks.webhook import WebhookSink
from triage.sinks.zendesk import ZendeskWriter
from triage.taxonomy import ConfigModel


def _http_url(value: str) -> str:
    # Checked here, not at the first delivery: httpx refuses a URL without a scheme as a
    # transport error, which would be retried as transient until the ticket dead-letters.
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value


HttpUrl = Annotated[str, AfterValidator(_http_url)]


class ZendeskSinkConfig(ConfigModel):
    base_url: HttpUrl
    email: str
    api_token_env: str
    groups: dict[str, int] = Field(default_factory=dict)  # department -> group id


class FreshdeskSinkConfig(ConfigModel):
    base_url: HttpUrl
    api_key_env: str
    groups: dict[str, int] = Field(default_factory=dict)  # department -> group id


class DjangoHelpdeskSinkConfig(ConfigModel):
    base_url: HttpUrl
    username: str
    password_env: str
    queue_ids: dict[str, int] = Field(default_factory=dict)  # queue slug -> queue id
    queues: dict[str, str] = Field(default_factory=dict)  # department -> slug (default: same)


class HelpdesksConfig(ConfigModel):
    zendesk: ZendeskSinkConfig | None = None
    freshdesk: FreshdeskSinkConfig | None = None
    django_helpdesk: DjangoHelpdeskSinkConfig | None = Field(None, alias="django-helpdesk")


class WebhookSinkConfig(ConfigModel):
    url: HttpUrl
    secret_env: str


class SinksFile(ConfigModel):
    timeout_seconds: float = Field(10.0, gt=0, le=120)
    helpdesks: HelpdesksConfig = HelpdesksConfig()
    webhooks: dict[str, WebhookSinkConfig] = Field(default_factory=dict)
    departments: dict[str, list[str]] = Field(default_factory=dict)
    default: list[str] = Field(default_factory=list)


def _secret(path: Path, field: str, env_name: str) -> str:
    # A secret read from a file or a Kubernetes secret often ends in a newline: sent as is, it
    # is a wrong password (401) or a wrong signing key, and every delivery dead-letters.
    value = os.environ.get(env_name, "").strip()
    if not value:
        raise ConfigError(f"{path}: {field}: environment variable {env_name} is not set")
    return value


def _writers(path: Path, spec: SinksFile, config: AppConfig) -> dict[str, Sink]:
    timeout = spec.timeout_seconds
    helpdesks = spec.helpdesks
    taxonomy = config.taxonomy
    own_tags = possible_tags(taxonomy.intent_names, taxonomy.department_names)
    writers: dict[str, Sink] = {}
    if helpdesks.zendesk:
        zd = helpdesks.zendesk
        writers["zendesk"] = ZendeskWriter(
            zd.base_url,
            email=zd.email,
            api_token=_secret(path, "helpdesks.zendesk.api_token_env", zd.api_token_env),
            groups=zd.groups,
            timeout_seconds=timeout,
            own_tags=own_tags,
        )
    if helpdesks.freshdesk:
        fd = helpdesks.freshdesk
        writers["freshdesk"] = FreshdeskWriter(
            fd.base_url,
            api_key=_secret(path, "helpdesks.freshdesk.api_key_env", fd.api_key_env),
            groups=fd.groups,
            timeout_seconds=timeout,
            own_tags=own_tags,
        )
    if helpdesks.django_helpdesk:
        dh = helpdesks.django_helpdesk
        writers["django-helpdesk"] = DjangoHelpdeskWriter(
            dh.base_url,
            username=dh.username,
            password=_secret(path, "helpdesks.django-helpdesk.password_env", dh.password_env),
            queues=dh.queues,
            queue_ids=dh.queue_ids,
            timeout_seconds=timeout,
        )
    return writers


def _named_sinks(path: Path, spec: SinksFile, config: AppConfig) -> dict[str, Sink]:
    sinks: dict[str, Sink] = {"helpdesk": HelpdeskWriteBack(_writers(path, spec, config))}
    for name, hook in spec.webhooks.items():
        sink = WebhookSink(
            name,
            hook.url,
            secret=_secret(path, f"webhooks.{name}.secret_env", hook.secret_env),
            timeout_seconds=spec.timeout_seconds,
        )
        sinks[sink.name] = sink
    return sinks


def _resolve(path: Path, field: str, names: list[str], sinks: dict[str, Sink]) -> tuple[Sink, ...]:
    resolved = []
    for name in names:
        if name == "queue":
            continue
        if name not in sinks:
            known = ", ".join(["queue", *sorted(sinks)])
            raise ConfigError(f"{path}: {field}: unknown sink {name!r} (known: {known})")
        resolved.append(sinks[name])
    return tuple(resolved)


def load_sinks_file(path: Path) -> SinksFile:
    raw = load_yaml_text(path, read_config_text(path)) or {}
    try:
        return SinksFile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None


def secret_variables(spec: SinksFile) -> set[str]:
    """The environment variables the file names for its secrets."""
    helpdesks = spec.helpdesks
    names = {hook.secret_env for hook in spec.webhooks.values()}
    if helpdesks.zendesk:
        names.add(helpdesks.zendesk.api_token_env)
    if helpdesks.freshdesk:
        names.add(helpdesks.freshdesk.api_key_env)
    if helpdesks.django_helpdesk:
        names.add(helpdesks.django_helpdesk.password_env)
    return names


def _check_departments(path: Path, field: str, names: Iterable[str], known: set[str]) -> None:
    # A misspelt department would otherwise be ignored without a word: its tickets would
    # simply never get their group or queue.
    for name in names:
        if name not in known:
            raise ConfigError(
                f"{path}: {field}.{name}: not a department in the taxonomy "
                f"(known: {', '.join(sorted(known))})"
            )


def build_sink_table(path: Path, config: AppConfig) -> SinkTable:
    """Read, validate and build every configured sink once; raise ConfigError naming the
    file, field and problem."""
    spec = load_sinks_file(path)
    departments = set(config.taxonomy.department_names)
    _check_departments(path, "departments", spec.departments, departments)
    helpdesks = spec.helpdesks
    if helpdesks.zendesk:
        _check_departments(path, "helpdesks.zendesk.groups", helpdesks.zendesk.groups, departments)
    if helpdesks.freshdesk:
        fd_groups = helpdesks.freshdesk.groups
        _check_departments(path, "helpdesks.freshdesk.groups", fd_groups, departments)
    if helpdesks.django_helpdesk:
        dh = helpdesks.django_helpdesk
        _check_departments(path, "helpdesks.django-helpdesk.queues", dh.queues, departments)
        for department, slug in dh.queues.items():
            if slug not in dh.queue_ids:
                raise ConfigError(
                    f"{path}: helpdesks.django-helpdesk.queues.{department}: queue {slug!r} "
                    f"is not in queue_ids (known: {', '.join(sorted(dh.queue_ids)) or 'none'})"
                )
    sinks = _named_sinks(path, spec, config)
    return SinkTable(
        by_department={
            department: _resolve(path, f"departments.{department}", names, sinks)
            for department, names in spec.departments.items()
        },
        default=_resolve(path, "default", spec.default, sinks),
        timeout_seconds=spec.timeout_seconds,
    )
