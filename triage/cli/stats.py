"""`triage stats`: what triage did over a window, and what it cost."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from triage.cli import filters as opt
from triage.cli.common import console, guarded, load_runtime, plain, print_json

app = typer.Typer()

# Applied in the code rather than as the option's default, so that only a --since the
# operator typed is held against --until: `stats --until 2020-01-01` alone is not a mistake.
DEFAULT_SINCE = "7d"
Since = Annotated[
    str | None,
    typer.Option(help="Received at or after: 7d, 12h or an ISO date/time (UTC; default: 7d)."),
]


@app.command()
@guarded
def stats(
    since: Since = None,
    until: opt.Until = None,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Tickets received in the window by state, intent, department and language; latency
    p50/p95/p99 per stage; tokens and cost per 1,000 tickets; dead-letter and review rates;
    how many labels reprocessing changed.

    Example: triage stats --since 2026-11-01 --until 2026-12-01 --json
    """
    from triage.db.stats import Window, compute

    start, end = opt.parse_window(since, until)
    if since is None:
        start = opt.parse_moment(DEFAULT_SINCE, option="--since")
    window = Window(start, end)
    rt = load_runtime()
    with rt.sessions() as session:
        data = compute(session, window)
    if as_json:
        print_json(data)
        return
    _print(data)


def _counts(title: str, counts: dict[str, int], total: int) -> Table:
    table = Table(title, "tickets", "share", title_justify="left")
    for key, n in counts.items():
        table.add_row(plain(key), str(n), f"{n / total:.1%}" if total else "-")
    return table


def _print(data: dict[str, Any]) -> None:
    w = data["window"]
    total = data["tickets"]
    console.print(
        f"[bold]{total} tickets[/] received {('since ' + w['since'][:19]) if w['since'] else ''}"
        f"{(' until ' + w['until'][:19]) if w['until'] else ''} (UTC)",
        highlight=False,
    )
    grid = Table.grid(padding=(0, 2))
    grid.add_row(
        _counts("state", data["by_state"], total),
        _counts("intent", data["by_intent"], total),
    )
    grid.add_row(
        _counts("department", data["by_department"], total),
        _counts("language", data["by_language"], total),
    )
    console.print(grid)
    latency = Table("stage", "n", "p50 ms", "p95 ms", "p99 ms", title="latency")
    for stage, s in data["latency"].items():
        latency.add_row(stage, str(s["n"]), *(_ms(s[k]) for k in ("p50_ms", "p95_ms", "p99_ms")))
    console.print(latency)
    u, r, rp = data["usage"], data["rates"], data["reprocessing"]
    per = u["per_1000_tickets"]
    console.print(
        f"usage: {u['labels']} labels, {u['api_calls']} API calls, {u['input_tokens']:,} in / "
        f"{u['output_tokens']:,} out tokens, ${u['cost_usd']} (of which "
        f"{u['without_label']['api_calls']} calls, ${u['without_label']['cost_usd']}, gave no "
        "label: refused, invalid or superseded answers, failed requests)\n"
        f"per 1,000 tickets: {per['input_tokens']:,} in / {per['output_tokens']:,} out tokens, "
        f"${per['cost_usd']}\n"
        f"dead-lettered now {r['dead_lettered_now']} ({_pct(r['dead_letter_rate'])}), ever "
        f"{r['ever_dead_lettered']} ({_pct(r['ever_dead_letter_rate'])}); "
        f"needs review {r['needs_review']} ({_pct(r['review_rate'])})\n"
        f"reprocessing: {rp['relabelled']} relabelled, {rp['labels_changed']} labels changed "
        f"({_pct(rp['change_rate'])})",
        highlight=False,
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
