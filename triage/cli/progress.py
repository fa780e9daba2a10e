"""The progress bar long commands share: count, rate and time left, on stderr so that stdout
stays clean for --json."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from triage.cli.common import err_console


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        # Over the whole run: Rich's own speed samples only the last few updates.
        elapsed = task.elapsed
        if not elapsed or not task.completed:
            return Text("-/s", style="progress.data.speed")
        return Text(f"{task.completed / elapsed:.1f}/s", style="progress.data.speed")


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
    )
