"""What every command shares: one-line errors, JSON output, the runtime."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from sqlalchemy.exc import ArgumentError, DBAPIError

from triage.errors import ConfigError, TriageError

if TYPE_CHECKING:
    from triage.pipeline.runtime import Runtime

console = Console()
err_console = Console(stderr=True)

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


def fail(message: str, code: int = EXIT_PROBLEM) -> NoReturn:
    # soft_wrap: one line however narrow the terminal, so a log or `grep` sees it whole.
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def plain(value: object) -> Text:
    """Text shown as it is. Subjects, external ids, error messages and model summaries are
    data, not Rich markup: "[urgent] refund" would lose its "[urgent]", and a "[/]" would
    raise instead of printing."""
    return Text(str(value))


@contextmanager
def clear_errors() -> Iterator[None]:
    """Turn triage's typed errors into one clear line and an exit code, not a traceback."""
    try:
        yield
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    except ValidationError as exc:
        # Settings() read straight from the environment (commands that need only the
        # database URL): a mistyped TRIAGE_* value is a usage error like any other.
        if exc.title != "Settings":
            raise
        from triage.config import settings_problems

        fail(settings_problems(exc), EXIT_USAGE)
    except TriageError as exc:
        # The operator's own terminal: the whole text, as `triage dlq show` has it.
        fail(exc.detail)
    except ArgumentError as exc:
        # Raised while parsing DATABASE_URL or loading its dialect, before any connection.
        fail(f"DATABASE_URL: {exc} (`triage doctor` diagnoses)", EXIT_USAGE)
    except DBAPIError as exc:
        # The driver's first line says what happened; the statement and parameters do not help.
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        fail(f"database error: {reason} (check DATABASE_URL; `triage doctor` diagnoses)")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with clear_errors():
            return fn(*args, **kwargs)

    return wrapper


def confirm_or_exit(question: str, *, yes: bool) -> None:
    """Ask before a destructive or expensive step; `--yes` answers for scripts. The answer is
    read from stdin, whatever it is: a terminal, or a pipe (`yes | triage dlq purge`). With no
    stdin, or one that ends before an answer (/dev/null, cron), refuse: exit 2, say --yes."""
    if yes:
        return
    refused = f"{question} — not confirmed (no answer); pass --yes to proceed"
    # No stdin at all (started with it closed, `<&-`): Python sets sys.stdin to None.
    if sys.stdin is None:
        fail(refused, EXIT_USAGE)
    try:
        # On stderr: stdout may be a --json document headed for jq or a file.
        confirmed = typer.confirm(question, default=False, err=True)
    except typer.Abort:
        fail(refused, EXIT_USAGE)
    if not confirmed:
        fail("cancelled", EXIT_PROBLEM)


def load_runtime() -> Runtime:
    """A runtime built from this invocation's environment (not the process-wide cached one,
    so that each command sees the settings it was started with)."""
    from triage.config import load_config
    from triage.pipeline.relay import OutboxOnlyPublisher
    from triage.pipeline.runtime import Runtime

    rt = Runtime(load_config())
    if not rt.settings.effective_broker_url():
        rt.__dict__["publisher"] = OutboxOnlyPublisher(rt.sessions, None)
    return rt


def shown_count(shown: int, noun: str, *, more: bool) -> str:
    """The line under a listing. When --limit cut it short, it says so: "50 tickets" alone
    reads as all there are."""
    if more:
        return f"{shown} {noun} shown, the newest; more match (raise --limit to see them)"
    return f"{shown} {noun}"


def broker_unreachable(rt: Runtime) -> str | None:
    """Why the configured broker cannot be reached, or None. For the commands that would
    otherwise find out message by message: each failed publish waits out a connection, and
    whatever cannot be sent is left in the outbox, reported as a success."""
    conn = rt.celery.connection_for_write()
    try:
        conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the finding
        lines = str(exc).strip().splitlines()
        return lines[0] if lines else type(exc).__name__
    finally:
        conn.release()
    return None


def stop_if_broker_unreachable(rt: Runtime, consequence: str) -> None:
    """Exit 1, saying `consequence`, when a broker is configured and cannot be reached: for a
    command to ask before it starts work whose messages could not be sent. With no broker
    configured (beside `triage run`) messages wait in the outbox for the relay: none to ask."""
    unreachable = rt.settings.effective_broker_url() and broker_unreachable(rt)
    if unreachable:
        fail(
            f"broker unreachable ({unreachable}): {consequence}; start Redis/RabbitMQ or fix "
            "REDIS_URL / TRIAGE_BROKER_URL"
        )


def fmt_time(moment: Any) -> str:
    # Stored times are UTC; said so, since an operator reads an unmarked time as local.
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if moment is not None else "-"
