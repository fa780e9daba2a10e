"""Figures against issue 7's targets: a Rich table for people, JSON for tracking. The bench
reports misses; it never fails the build."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from bench.probe import SLOW_MS

# name, target text, check(result) -> (figure text, passed or None when not applicable)
Row = tuple[str, str, str, bool | None]


def _mark(ok: bool | None) -> str:
    if ok is None:
        return "-"
    return "[green]PASS[/]" if ok else "[red]MISS[/]"


def _cpu(figures: dict[str, Any]) -> str:
    """CPU milliseconds per ticket, total and by process group."""
    per = dict(figures.get("cpu_ms_per_ticket") or {})
    # The fake stands in for the remote API and the load generator for the helpdesks: shown,
    # but not counted as triage's.
    fake = per.pop("fake_api", None)
    client = per.pop("load_generator", None)
    parts = " + ".join(f"{k} {v:.1f}" for k, v in per.items())
    text = f"{sum(per.values()):.1f}" + (f" ({parts})" if len(per) > 1 else "")
    text += f"; fake API {fake:.1f}" if fake is not None else ""
    return text + (f", load generator {client:.1f}" if client is not None else "")


def _cpu_ceiling(figures: dict[str, Any], cores: int) -> float | None:
    """Tickets/s at which the run's processes (the fake API and the load generator included:
    they share the cores) would keep every core busy at this CPU per ticket. Above the ideal,
    the call slots set the rate; below it, the CPU does."""
    total = sum((figures.get("cpu_ms_per_ticket") or {}).values())
    return round(cores * 1000 / total, 1) if total > 0 else None


def rows(result: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    anchor = result.get("anchor") or {}
    cpu = result.get("cpu_bound") or {}
    if anchor:
        out.append(
            (
                "1. anchor: bare Celery two-hop",
                "(reference)",
                f"{anchor['tickets_per_second']} tickets/s "
                f"({anchor['tickets']} in {anchor['elapsed_seconds']} s); "
                f"CPU {_cpu(anchor)} ms/ticket",
                None,
            )
        )
    if cpu:
        ratio = cpu["tickets_per_second"] / anchor["tickets_per_second"] if anchor else None
        cpu["ratio_to_anchor"] = round(ratio, 3) if ratio else None
        out.append(
            (
                "2. triage CPU-bound (fake 0 ms), end to end",
                ">= 0.6x anchor",
                f"{cpu['tickets_per_second']} tickets/s = "
                + (f"{ratio:.2f}x anchor " if ratio is not None else "(no anchor) ")
                + f"({cpu['tickets']} in {cpu['elapsed_seconds']} s); "
                f"CPU {_cpu(cpu)} ms/ticket",
                None if ratio is None else ratio >= 0.6,
            )
        )
    cores = result["machine"]["cores"] or 1
    io_rows = (
        ("io_fixed", "3a. I/O-bound, fake 0.5 s"),
        ("io_random", "3b. I/O-bound, fake 0.2-2 s"),
    )
    io_anchor = result.get("io_anchor")
    if io_anchor:
        io_anchor["cpu_ceiling_per_second"] = ceiling = _cpu_ceiling(io_anchor, cores)
        out.append(
            (
                "3a (anchor). bare Celery two-hop with triage's call, fake 0.5 s",
                "(reference)",
                f"{io_anchor['tickets_per_second']} of {io_anchor['ideal_per_second']} "
                f"tickets/s = {io_anchor['fraction_of_ideal']:.0%}; peak "
                f"{io_anchor['peak_in_flight']} in flight (mean {io_anchor['mean_in_flight']}); "
                f"CPU {_cpu(io_anchor)} ms/ticket, {io_anchor.get('cores_busy', '?')} cores "
                f"busy; the {cores} cores allow {ceiling if ceiling else '?'} tickets/s",
                None,
            )
        )
    for key, label in io_rows:
        io = result.get(key)
        if not io:
            continue
        ok = io["fraction_of_ideal"] >= 0.9 and io["peak_in_flight"] >= 200
        io["cpu_ceiling_per_second"] = ceiling = _cpu_ceiling(io, cores)
        versus = ""
        if key == "io_fixed" and io_anchor:
            io["ratio_to_io_anchor"] = ratio = round(
                io["tickets_per_second"] / io_anchor["tickets_per_second"], 3
            )
            versus = f" = {ratio:.2f}x the anchor with the same call"
        out.append(
            (
                label,
                ">= 90% of ideal, >= 200 in flight",
                f"{io['tickets_per_second']} of {io['ideal_per_second']} tickets/s = "
                f"{io['fraction_of_ideal']:.0%}{versus}; peak {io['peak_in_flight']} in flight "
                f"(mean {io['mean_in_flight']}); CPU {_cpu(io)} ms/ticket, "
                f"{io.get('cores_busy', '?')} cores busy; at this CPU per ticket the "
                f"{cores} cores allow {ceiling if ceiling else '?'} tickets/s",
                ok if key == "io_fixed" else None,
            )
        )
        if key == "io_fixed":
            rss = io["worker_rss_mib"]
            peak = max(rss) if rss else 0.0
            out.append(
                (
                    "3c. worker memory at full concurrency",
                    "< 300 MiB per worker",
                    f"{', '.join(f'{v:.0f}' for v in rss)} MiB "
                    f"({result['fleet']['processes']} x {result['fleet']['concurrency']} threads)",
                    bool(rss) and peak < 300,
                )
            )
    ing = result.get("ingestion")
    if ing:
        fixed, flat = ing["fixed_rate"], ing["max_rate"]
        out.append(
            (
                f"4a. webhook at {fixed['offered_per_second']:.0f} req/s (API alone)",
                "p99 < 50 ms",
                f"p50 {fixed['p50_ms']} ms, p99 {fixed['p99_ms']} ms, "
                f"{fixed['non_202']} non-202 of {fixed['requests']}; "
                f"CPU {_request_cpu(fixed)} ms/request",
                fixed["p99_ms"] < 50 and fixed["non_202"] == 0,
            )
        )
        out.append(
            (
                "4b. webhook max rate (32 clients)",
                "(reported)",
                f"{flat['requests_per_second']} req/s, p50 {flat['p50_ms']} ms, "
                f"p99 {flat['p99_ms']} ms; CPU {_request_cpu(flat)} ms/request",
                None,
            )
        )
    for key, name, target in (
        ("overhead", "5. per-ticket overhead", "p99 < 100 ms"),
        ("overhead_quarter", "5b. per-ticket overhead", "(reported)"),
    ):
        ov = result.get(key)
        if not ov:
            continue
        o = ov["overhead_ms"]
        out.append(
            (
                f"{name} at {ov['offered_per_second']} tickets/s",
                target,
                f"p50 {o['p50']} ms, p99 {o['p99']} ms (model {ov['model_latency_seconds']} s "
                f"excluded); before the call p50 {ov['overhead_ms_before_model']['p50']} ms, "
                f"after the label p50 {ov['overhead_ms_after_label']['p50']} ms; "
                f"{_slow_seconds(ov.get('over_100ms_by_second', {}))}",
                o["p99"] < 100 if key == "overhead" else None,
            )
        )
    return out


def _slow_seconds(by_second: dict[Any, int]) -> str:
    """Tickets over SLOW_MS, and how many of them arrived in the run's first two seconds (JSON
    gives the keys back as strings)."""
    total = sum(by_second.values())
    if not total:
        return f"none over {SLOW_MS:.0f} ms"
    early = sum(n for second, n in by_second.items() if int(second) < 2)
    return f"{total} over {SLOW_MS:.0f} ms, {early} of them in the first 2 s"


def print_table(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    m, fleet = result["machine"], result["fleet"]
    title = (
        f"triage bench: {m['cores']} cores, load average at start "
        f"{' '.join(str(x) for x in m['load_average_at_start'])}; fleet "
        f"{fleet['processes']} worker processes x {fleet['concurrency']} threads"
    )
    speed = m.get("speed")
    if speed:
        title += (
            f"\nmachine speed: an empty Python loop {speed['python_loop_seconds']} s per 10M; "
            f"a wake-up round trip between two processes {speed['wake_round_trip_cpu_us']} µs "
            f"of CPU ({speed['wake_round_trip_wall_us']} µs wall); a Redis PING "
            f"{speed['redis_ping_cpu_us']} µs of CPU ({speed['redis_ping_wall_us']} µs wall)"
        )
    table = Table(title=title, show_lines=False)
    table.add_column("scenario")
    table.add_column("target")
    table.add_column("measured")
    table.add_column("")
    for name, target, figure, ok in rows(result):
        table.add_row(name, target, figure, _mark(ok))
    console.print(table)


def _request_cpu(figures: dict[str, Any]) -> str:
    cpu = figures.get("cpu_ms_per_request")
    if not cpu:
        return "?"
    return f"{cpu['api']} (api) + {cpu['postgres']} (postgres)"
