"""`triage doctor`: is everything triage needs there and healthy?"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import typer
from rich.table import Table

from triage.cli.common import EXIT_PROBLEM, console, guarded, plain, print_json

app = typer.Typer()


@dataclass
class Check:
    name: str
    status: str  # ok | problem | skipped
    detail: str
    todo: str | None = None


@app.command()
@guarded
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    timeout: float = typer.Option(5.0, min=0.1, help="Seconds to wait for each service."),
) -> None:
    """Check config, database (reachable, migrations current), broker, the Anthropic API (one
    free call that validates the key) and queue depths. Exits 1 and says what to do when
    something is wrong.

    Example: DATABASE_URL=postgresql://db/triage REDIS_URL=redis://cache triage doctor
    """
    from pydantic import ValidationError

    from triage.config import Settings, settings_problems
    from triage.errors import ConfigError

    checks: list[Check] = []
    config: Any = None
    settings: Any = None
    try:
        settings = Settings()
    except Exception as exc:  # noqa: BLE001 - settings from the environment may be invalid
        # pydantic's own text repeats each input, and a broker URL may carry a password.
        detail = settings_problems(exc) if isinstance(exc, ValidationError) else str(exc)
        checks.append(Check("config", "problem", detail, "fix the TRIAGE_* environment"))
    if settings is not None:
        from triage.config import load_config
        from triage.sinks.registry import load_sinks

        try:
            config = load_config(settings)
            # As `config validate` and the worker's start-up do: sinks.yaml and its secrets.
            load_sinks(config)
            checks.append(
                Check(
                    "config",
                    "ok",
                    f"{config.settings.config_dir} (taxonomy {config.taxonomy.version}, "
                    f"backend {settings.effective_backend()}, model {settings.model})",
                )
            )
        except ConfigError as exc:
            # The services are checked all the same: a broken config/ file must not hide a
            # database that is down too, to be found only on the next run of doctor.
            checks.append(
                Check("config", "problem", str(exc), "fix it, then `triage config validate`")
            )
        checks.append(_database(settings.database_url, timeout))
        checks.append(_broker(settings.effective_broker_url(), timeout))
        checks.append(_api(config, settings, timeout))
        checks.append(_queues(config, settings.effective_broker_url(), timeout))
    problems = [c for c in checks if c.status == "problem"]
    if as_json:
        print_json({"ok": not problems, "checks": [asdict(c) for c in checks]})
    else:
        table = Table("check", "status", "detail")
        styles = {"ok": "green", "problem": "bold red", "skipped": "yellow"}
        for c in checks:
            table.add_row(c.name, f"[{styles[c.status]}]{c.status}[/]", plain(c.detail))
        console.print(table)
        for c in problems:
            console.print(f"[bold red]{c.name}:[/] what to do: {c.todo}", highlight=False)
        if not problems:
            console.print("[green]all checks passed[/]")
    if problems:
        raise typer.Exit(EXIT_PROBLEM)


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}"[:300]


def _database(url: str, timeout: float) -> Check:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from triage.db.migrate import current_revision, head_revision
    from triage.db.session import normalize_url

    is_pg = url.startswith(("postgres", "postgresql"))
    try:
        shown = make_url(normalize_url(url)).render_as_string(hide_password=True)
        engine = create_engine(
            normalize_url(url),
            connect_args={"connect_timeout": int(max(1, timeout))} if is_pg else {},
        )
    except Exception as exc:  # noqa: BLE001 - an unparsable URL or unknown dialect is the finding
        return Check(
            "database",
            "problem",
            f"DATABASE_URL is not a database URL: {_one_line(exc)}",
            "set DATABASE_URL like postgresql://user:password@host:5432/triage",
        )
    missing = _missing_sqlite_file(engine.url)
    if missing is not None:
        engine.dispose()
        # Connecting would create it: a typo in the path would become a new, empty database
        # that `triage db upgrade` then makes look healthy.
        return Check(
            "database",
            "problem",
            f"{shown}: the file {missing} does not exist",
            "fix the path in DATABASE_URL (for a new install, `triage db upgrade` creates it)",
        )
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        applied, head = current_revision(engine), head_revision(url)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the finding
        todo = (
            "start PostgreSQL or fix DATABASE_URL"
            if is_pg
            else "check that the SQLite file's folder exists and is writable (DATABASE_URL)"
        )
        return Check("database", "problem", f"{shown} unreachable: {_one_line(exc)}", todo)
    finally:
        engine.dispose()
    if applied != head:
        return Check(
            "database",
            "problem",
            f"{shown}: schema at {applied or 'nothing'}, latest is {head}",
            "run `triage db upgrade`",
        )
    return Check("database", "ok", f"{shown}, migrations at head ({head})")


def _missing_sqlite_file(url: Any) -> str | None:
    """The SQLite file `url` names when it does not exist (None for other databases, memory
    databases and files that exist)."""
    from pathlib import Path

    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    if url.database.startswith("file:"):
        return None  # a URI filename: its own query decides whether it may be created
    path = Path(url.database)
    return None if path.exists() else str(path)


def _broker(url: str | None, timeout: float) -> Check:
    if not url:
        return Check("broker", "skipped", "none configured (`triage run` starts an embedded Redis)")
    from sqlalchemy.engine import make_url

    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as the scheme only
        shown = url.split("://", 1)[0] + "://…"
    try:
        if url.startswith(("redis://", "rediss://")):
            import redis

            redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping()
        else:
            from kombu import Connection

            with Connection(url, connect_timeout=timeout) as conn:
                conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the finding
        return Check(
            "broker",
            "problem",
            f"{shown} unreachable: {_one_line(exc)}",
            "start Redis/RabbitMQ or fix REDIS_URL / TRIAGE_BROKER_URL",
        )
    return Check("broker", "ok", shown)


def _api(config: Any, settings: Any, timeout: float) -> Check:
    import anthropic

    from triage.classify.backends.anthropic import make_client

    if settings.effective_backend() == "local":
        return Check("anthropic api", "skipped", "offline backend (local); no API calls made")
    if settings.anthropic_api_key is None:
        return Check("anthropic api", "skipped", "no API key")
    client = make_client(
        api_key=settings.anthropic_api_key.get_secret_value(),
        base_url=settings.anthropic_base_url,
        timeout=timeout,
    )
    where = settings.anthropic_base_url or "api.anthropic.com"
    try:
        # The Models API is free and needs a valid key: reachability, key and model at once.
        model = client.models.retrieve(settings.model)
    except anthropic.AuthenticationError:
        return Check(
            "anthropic api",
            "problem",
            f"{where}: the API key was rejected (401)",
            "set a valid ANTHROPIC_API_KEY",
        )
    except anthropic.NotFoundError:
        return Check(
            "anthropic api",
            "problem",
            f"{where}: model {settings.model} not found for this key",
            "set TRIAGE_MODEL to a model your account can use",
        )
    except anthropic.APIStatusError as exc:
        return Check(
            "anthropic api",
            "problem",
            f"{where}: HTTP {exc.status_code}",
            "retry later; check status.anthropic.com",
        )
    except anthropic.APIError as exc:
        return Check(
            "anthropic api",
            "problem",
            f"{where} unreachable: {_one_line(exc)}",
            "check the network/proxy or ANTHROPIC_BASE_URL",
        )
    finally:
        client.close()
    return Check("anthropic api", "ok", f"{where}: key valid, model {model.id} available")


def _queues(config: Any, url: str | None, timeout: float) -> Check:
    if not url:
        return Check("queues", "skipped", "no broker configured")
    if config is None:
        return Check("queues", "skipped", "the taxonomy, which names the queues, did not load")
    from triage.pipeline.celery_app import all_queues
    from triage.pipeline.routing import DEAD_QUEUE

    names = [*all_queues(config), DEAD_QUEUE]
    try:
        depths = _depths(url, names, timeout)
    except Exception as exc:  # noqa: BLE001 - the broker check names the cause
        return Check("queues", "skipped", f"could not read depths: {_one_line(exc)}")
    shown = ", ".join(f"{name} {depth}" for name, depth in depths.items())
    return Check("queues", "ok", shown)


def _depths(url: str, names: list[str], timeout: float) -> dict[str, int]:
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        # Celery's Redis transport keeps each queue as a list named after it.
        return {name: int(client.llen(name)) for name in names}
    from kombu import Connection

    depths: dict[str, int] = {}
    with Connection(url, connect_timeout=timeout) as conn:
        channel = conn.default_channel
        for name in names:
            try:
                depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
            except Exception:  # noqa: BLE001 - a queue no worker declared yet is empty
                depths[name] = 0
                channel = conn.channel()
    return depths
