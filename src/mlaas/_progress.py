"""Rich progress bars for long work: events, events/s and MB/s.

Private helper of the CLI; library functions take a plain callback instead,
so they print nothing unless asked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["event_progress", "console", "err_console"]

# soft_wrap: a path or URL printed by a command must come out on one line, even
# when the output is a pipe (rich would otherwise hard-wrap at 80 columns and
# scripts reading the output would get half a path)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


class _Rate(ProgressColumn):
    """events/s from the task, MB/s from the bytes kept in its fields."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("")
        rate = task.completed / elapsed
        mb = task.fields.get("bytes", 0) / elapsed / 1e6
        return Text(f"{rate:,.0f} ev/s {mb:,.0f} MB/s", style="cyan")


@contextlib.contextmanager
def event_progress(description: str, total: int | None,
                   enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """Yield ``advance(events, bytes)``; draws a bar on stderr when ``enabled``."""
    if not enabled:
        yield lambda events, nbytes: None
        return
    # one line in 80 columns for millions of events at millions per second: the time
    # left while running, the time taken once done (two time columns wrapped MB/s)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(bar_width=16), TaskProgressColumn(),
               TextColumn("{task.completed:,} events"), _Rate(),
               TimeRemainingColumn(elapsed_when_finished=True)]
    with Progress(*columns, console=err_console, transient=False) as bar:
        task = bar.add_task(description, total=total, bytes=0)

        def advance(events: int, nbytes: int) -> None:
            fields = bar.tasks[task].fields
            bar.update(task, advance=events, bytes=fields.get("bytes", 0) + nbytes)

        yield advance
        if total is None:
            bar.update(task, total=bar.tasks[task].completed)
