"""A live progress bar for a batch: lines done of total, rate, ETA, status (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

from .batches import Batch


class RateColumn(ProgressColumn):
    """Lines per second over rich's recent window."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} lines/s" if task.speed else "- lines/s", style="progress.data.speed")


def watch(client, batch_id: str, *, console: Console | None = None, poll_s: float = 0.5,
          timeout: float | None = None) -> Batch:
    """Poll the batch until it ends, drawing a bar on stderr; returns the final Batch. On a
    terminal that is not a TTY (CI logs, pipes) rich prints the final state only."""
    console = console or Console(stderr=True)
    with Progress(TextColumn("[bold]{task.description:<12}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), TextColumn("elapsed"), TimeElapsedColumn(),
                  TextColumn("{task.fields[failed]} failed"), console=console, transient=False) as bar:
        first = client.get(batch_id)
        task = bar.add_task(first.status, total=first.request_counts.total or None, failed=0)

        def show(b: Batch) -> None:
            rc = b.request_counts
            bar.update(task, total=rc.total or None, completed=rc.completed + rc.failed,
                       description=b.status + (" (ingest waiting)" if b.ingest_waiting_since else ""), failed=rc.failed)
        return client.wait(batch_id, timeout=timeout, poll_s=poll_s, on_progress=show)
