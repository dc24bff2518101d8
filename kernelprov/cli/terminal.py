"""What the ``kernelprov`` command draws on a terminal: progress bars and tables (through rich).

Called by the commands in :mod:`kernelprov.cli.kernel_commands` and
:mod:`kernelprov.cli.cache_commands`. rich is imported only when something is drawn, so the warm
``kernelprov unpack --quiet`` that ``run.sh`` runs never loads it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence


@contextlib.contextmanager
def progress(description: str, enabled: bool) -> Iterator:
    """Yield a (done, total) callback that draws a progress bar on a terminal, or None.

    Called around ``ensure_staged`` by ``kernelprov unpack``; None (no bar) when ``enabled`` is
    false or stderr is not a terminal (a job prologue's log, run.sh)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def print_table(headers: Sequence[str], rows: list[Sequence[str]]) -> None:
    """Print ``rows`` under ``headers`` without borders; 200 columns wide when piped, so that a
    script reading ``kernelprov list`` gets whole lines. Called by ``list`` and ``cache list``."""
    from rich.console import Console
    from rich.table import Table

    table = Table(*headers, box=None, header_style="bold")
    for row in rows:
        table.add_row(*row)
    Console(width=200 if not sys.stdout.isatty() else None).print(table)
