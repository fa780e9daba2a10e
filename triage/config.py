"""Settings from the environment, and the validated config/ files they point to.

Environment names follow DESIGN.md: DATABASE_URL, REDIS_URL, ANTHROPIC_API_KEY and
ANTHROPIC_BASE_URL unprefixed; everything else TRIAGE_*.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from kombu.transport import TRANSPORT_ALIASES
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from triage.errors import ConfigError
from triage.taxonomy import Taxonomy

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BackendName = Literal["auto", "anthropic", "local", "cascade"]
UpdatePolicy = Literal["ignore", "retriage"]
# What redis-py connects to; REDIS_URL is the broker too unless TRIAGE_BROKER_URL is set.
_REDIS_SCHEMES = ("redis", "rediss", "unix")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRIAGE_", extra="ignore")

    database_url: str = Field(
        default=f"sqlite:///{PROJECT_ROOT / 'var' / 'triage.sqlite3'}",
        validation_alias=AliasChoices("DATABASE_URL", "TRIAGE_DATABASE_URL"),
    )
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "TRIAGE_REDIS_URL")
    )
    # Defaults to REDIS_URL; may point at RabbitMQ (amqp://) while Redis keeps the limits.
    broker_url: str | None = None
    anthropic_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("ANTHROPIC_API_KEY", "TRIAGE_ANTHROPIC_API_KEY")
    )
    anthropic_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ANTHROPIC_BASE_URL", "TRIAGE_ANTHROPIC_BASE_URL"),
    )
    model: str = "claude-haiku-4-5"
    escalation_model: str | None = "claude-sonnet-5"
    backend: BackendName = "auto"
    config_dir: Path = PROJECT_ROOT / "config"

    # A label is ~80 output tokens; 256 leaves room without paying for runaway output.
    max_tokens: int = Field(256, ge=64, le=4096)
    api_timeout_seconds: float = Field(30.0, gt=0)
    # Identical ticket text within this window reuses the earlier label: no second paid call.
    reuse_window_hours: float = Field(72.0, ge=0)
    redact_personal_data: bool = True
    # What of a ticket's cleaned body the model is shown. A ticket's intent is in its first
    # lines; a pasted log or a mail thread of a megabyte would otherwise cost dollars per
    # ticket, or exceed the model's context and be dead-lettered. ~8,000 characters is about
    # 2,000 tokens.
    max_ticket_chars: int = Field(8000, ge=500)

    webhook_secret_generic: SecretStr | None = None
    webhook_secret_zendesk: SecretStr | None = None
    webhook_secret_freshdesk: SecretStr | None = None
    webhook_secret_django_helpdesk: SecretStr | None = None
    # GET /tickets/{id} shows labels, summaries and errors for sequential ids, on the port
    # helpdesks must reach. Set, it asks for `Authorization: Bearer <token>`.
    api_read_token: SecretStr | None = None
    webhook_tolerance_seconds: int = Field(300, ge=1)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    # Freshdesk does not sign: its automation sends the shared secret in this header (or as the
    # basic-auth password).
    freshdesk_token_header: str = "X-Triage-Token"  # noqa: S105 - a header name
    # A helpdesk update with new customer text on a ticket triage already holds: leave the
    # ticket as it is, or append the text and classify it again (history kept).
    update_policy: UpdatePolicy = "ignore"

    # Model calls in flight per worker process.
    worker_concurrency: int = Field(200, ge=1)
    # Most tickets (or dispatches) one task message carries. Rows published together go out
    # as one message and are claimed, recorded and routed in shared transactions; under light
    # load a batch is one ticket, so this costs no latency.
    batch_size: int = Field(32, ge=1, le=500)
    # Connections each process keeps to PostgreSQL, and at most uses. Threads hold
    # one only for short transactions, never across a model call, so this follows the CPU, not
    # the concurrency; keep processes x pool under the server's max_connections.
    db_pool_size: int = Field(10, ge=1)
    # A worker serves its Prometheus metrics here when set (the API serves /metrics itself).
    worker_metrics_port: int | None = Field(None, ge=1, le=65535)
    # Retry policy per stage (see triage/reliability/retry.py for how they combine).
    classify_max_attempts: int = Field(6, ge=1)
    classify_base_delay: float = Field(2.0, ge=0)
    classify_max_delay: float = Field(300.0, ge=0)
    classify_max_age: float = Field(6 * 3600.0, gt=0)
    deliver_max_attempts: int = Field(8, ge=1)
    deliver_base_delay: float = Field(5.0, ge=0)
    deliver_max_delay: float = Field(600.0, ge=0)
    deliver_max_age: float = Field(24 * 3600.0, gt=0)
    # Shared API budget across all workers (0 = unlimited); set to your account's tier.
    api_calls_per_minute: int = Field(0, ge=0)
    api_input_tokens_per_minute: int = Field(0, ge=0)
    # Circuit breaker: this many 429/529 answers within the window pause calls for cooldown.
    circuit_threshold: int = Field(20, ge=1)
    circuit_window_seconds: float = Field(30.0, gt=0)
    circuit_cooldown_seconds: float = Field(30.0, gt=0)
    # One 401 (the API key rejected) opens the circuit at once for this long: a key is fixed
    # by a person, in minutes, and each probe after it costs one ticket one attempt.
    circuit_auth_cooldown_seconds: float = Field(300.0, gt=0)
    # How often each worker's sweeper relays the outbox and looks for stuck tickets.
    sweep_interval_seconds: float = Field(10.0, gt=0)
    # Tickets stuck in a non-terminal state longer than this are re-enqueued by the sweeper.
    stuck_after_seconds: float = Field(300.0, gt=0)
    # triage.dead announces each dead letter to whoever watches it. Without a consumer it
    # would grow for ever in Redis; the sweeper keeps the newest this many (0: no limit). The
    # dead_letters table is the record, so nothing an operator needs is lost with them.
    dead_queue_max_length: int = Field(10_000, ge=0)
    # How long past its requests' timeouts a claim (a classify attempt's, a delivery's) still
    # belongs to the worker that made it: admission wait, database work under load. After
    # that the worker is presumed dead and the work may be taken over. Lower recovers from
    # crashed workers sooner, at the risk of doing twice what a slow worker was still doing.
    claim_grace_seconds: float = Field(31.0, ge=5)
    # Outbox rows sent longer ago than this are deleted by the sweeper (two per ticket would
    # otherwise pile up for ever). The ticket's own history (attempts, labels, dispatches,
    # dead letters) is kept; a sent message's row is only needed while it may be in flight.
    outbox_retention_hours: float = Field(24.0, gt=0)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        # Without a scheme ("localhost:6379") kombu would speak AMQP to the Redis port, and
        # redis-py refuse it only when the shared limits are first used. The URL may hold a
        # password: the message does not repeat it.
        if value and ("://" not in value or urlsplit(value).scheme not in _REDIS_SCHEMES):
            raise ValueError(
                "not a Redis URL: redis://[:password@]host:port/db (rediss:// for TLS, "
                "unix:///path.sock)"
            )
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        if value and (
            "://" not in value or urlsplit(value).scheme.split("+", 1)[0] not in TRANSPORT_ALIASES
        ):
            raise ValueError(
                "not a broker URL: redis://host:port/db, rediss://… or "
                "amqp://user:password@host:5672/vhost"
            )
        return value

    @field_validator("anthropic_api_key", mode="before")
    @classmethod
    def _key_as_issued(cls, value: Any) -> Any:
        # A key read from a file or a Kubernetes secret often ends in a newline, which httpx
        # refuses in a header: every call would fail. A blank one (`ANTHROPIC_API_KEY=` in an
        # env file) is no key, not a key the API answers 401 to for every ticket.
        if isinstance(value, str):
            return value.strip() or None
        return value

    def effective_backend(self) -> Literal["anthropic", "local", "cascade"]:
        if self.backend != "auto":
            return self.backend
        return "cascade" if self.anthropic_api_key else "local"

    def effective_broker_url(self) -> str | None:
        return self.broker_url or self.redis_url

    def limits_redis_url(self) -> str | None:
        """Where shared limits live: REDIS_URL, or the broker when that is Redis."""
        if self.redis_url:
            return self.redis_url
        broker = self.effective_broker_url()
        return broker if broker and broker.startswith(("redis://", "rediss://")) else None

    def webhook_secret(self, source: str) -> str | None:
        secret: SecretStr | None = getattr(self, f"webhook_secret_{source.replace('-', '_')}", None)
        return secret.get_secret_value() if secret else None


class ModelSpec(BaseModel):
    """One row of config/models.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_mtok: Decimal = Field(ge=0)
    output_per_mtok: Decimal = Field(ge=0)
    cache_read_per_mtok: Decimal = Field(Decimal("0"), ge=0)
    cache_write_per_mtok: Decimal = Field(Decimal("0"), ge=0)
    batch_discount: Decimal = Field(Decimal("0.5"), ge=0, le=1)
    # Whether the model accepts temperature; later models answer 400 to any sampling parameter.
    sampling: bool = True

    def cost(
        self,
        input_tokens: int,
        output_tokens: int,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        *,
        batch: bool = False,
    ) -> Decimal:
        million = Decimal(1_000_000)
        total = (
            self.input_per_mtok * input_tokens
            + self.output_per_mtok * output_tokens
            + self.cache_read_per_mtok * cache_read_tokens
            + self.cache_write_per_mtok * cache_write_tokens
        ) / million
        if batch:
            total *= self.batch_discount
        return total.quantize(Decimal("0.000001"))


class ModelTable(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, ModelSpec]

    def spec(self, model: str) -> ModelSpec:
        try:
            return self.models[model]
        except KeyError:
            raise ConfigError(
                f"models.yaml: model {model!r} is not in the table; add its prices and "
                f"capabilities (known: {', '.join(sorted(self.models))})"
            ) from None


@dataclass(frozen=True)
class AppConfig:
    """Everything triage needs at run time, validated once at start-up."""

    settings: Settings
    taxonomy: Taxonomy
    models: ModelTable


def read_config_text(path: Path) -> str:
    """A file of config/ as text; any reason it cannot be read is a ConfigError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
        ) from None
    except OSError as exc:
        # A directory in the file's place, a permission denied: start-up must say which file.
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping. PyYAML keeps the last one
    without a word: an intent block pasted under a name already in use would silently replace
    the first intent, a second `routing:` drop the first one's thresholds and overrides."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        # Before merging: a key written out may override one merged in with `<<`.
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:
                continue  # an unhashable key: construct_mapping below says so
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} (first given on line {first.line + 1})",
                    key_node.start_mark,
                )
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


# YAML 1.1, which PyYAML follows, reads yes/no/on/off (any case) as booleans: `language: no`
# (Norwegian) or a department named `on` would load as False/True and be refused as "not a
# valid string". Only true/false are booleans here, as in YAML 1.2; a boolean setting still
# accepts yes/no/on/off, which pydantic reads as the words they are.
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml_text(path: Path, text: str) -> Any:
    """Parse a config/ file's text; invalid YAML (a duplicate key too) is a ConfigError
    naming the file."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def _read_yaml(path: Path) -> Any:
    return load_yaml_text(path, read_config_text(path))


def _validation_message(path: Path, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        problems.append(f"{field}: {err['msg']}")
    return f"{path}: " + "; ".join(problems)


def load_taxonomy(path: Path) -> Taxonomy:
    try:
        return Taxonomy.model_validate(_read_yaml(path))
    except ValidationError as exc:
        raise ConfigError(_validation_message(path, exc)) from None


def load_models(path: Path) -> ModelTable:
    try:
        return ModelTable.model_validate(_read_yaml(path))
    except ValidationError as exc:
        raise ConfigError(_validation_message(path, exc)) from None


def setting_variables() -> set[str]:
    """Every environment variable name Settings reads."""
    names: set[str] = set()
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice) for choice in alias.choices)
        else:
            names.add(f"TRIAGE_{field.upper()}")
    return names


def unknown_triage_variables(environ: Mapping[str, str], also_read: set[str]) -> list[str]:
    """TRIAGE_* variables nothing reads (besides `also_read`, the secrets sinks.yaml names),
    each with the setting it most looks like: a misspelt name is otherwise ignored without a
    word and its setting keeps the default."""
    known = setting_variables() | also_read
    found = []
    for name in sorted(environ):
        if name.startswith("TRIAGE_") and name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
            found.append(f"{name} (did you mean {near[0]}?)" if near else name)
    return found


def _env_name(field: str) -> str:
    """The environment variable an operator sets for a Settings field."""
    info = Settings.model_fields.get(field)
    if info is None:
        return field
    alias = info.validation_alias
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return f"TRIAGE_{field.upper()}"


def settings_problems(exc: ValidationError) -> str:
    """What is wrong with the settings read from the environment, on one line, each problem
    under the variable's name (TRIAGE_WORKER_CONCURRENCY, not worker_concurrency)."""
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        field = ".".join([_env_name(loc[0]), *loc[1:]]) if loc else "(top level)"
        problems.append(f"{field}: {err['msg']}")
    return "environment: " + "; ".join(problems)


def load_config(settings: Settings | None = None) -> AppConfig:
    """Read and validate everything; raise ConfigError naming the file, field and problem."""
    try:
        settings = settings or Settings()
    except ValidationError as exc:
        raise ConfigError(settings_problems(exc)) from None
    config_dir = settings.config_dir
    taxonomy = load_taxonomy(config_dir / "taxonomy.yaml")
    models = load_models(config_dir / "models.yaml")
    if settings.effective_backend() in ("anthropic", "cascade"):
        if settings.anthropic_api_key is None:
            # Checked here, not only when the worker builds its backend: `config validate`
            # must refuse what would stop the worker.
            raise ConfigError(
                f"environment: TRIAGE_BACKEND={settings.backend} needs ANTHROPIC_API_KEY, "
                "which is not set (or blank); set it, or use TRIAGE_BACKEND=local to run offline"
            )
        models.spec(settings.model)
        if settings.escalation_model:
            models.spec(settings.escalation_model)
    else:
        # The offline backend trains on first use; a bad training row must stop start-up (and
        # fail `config validate`), not the first ticket. Imported here: it brings scikit-learn.
        from triage.classify.backends.local import load_examples

        load_examples(taxonomy, config_dir)
    return AppConfig(settings=settings, taxonomy=taxonomy, models=models)


@lru_cache(maxsize=1)
def get_config() -> AppConfig:
    """The process-wide config, loaded on first use (the API and worker call it at start)."""
    return load_config()
