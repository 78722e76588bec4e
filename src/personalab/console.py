"""Progress bars and one-line status messages for long work (rich), silenced with ``enabled=False``.

On a terminal a progress bar redraws in place; when the output goes to a file or a pipe (a job's log), where a bar
would show nothing until the end, ``progress_bar`` writes a plain line when the work starts, at least every
``LOG_EVERY`` seconds while it runs, and when it ends.
"""

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

LOG_EVERY = 30.0
"""Seconds between the progress lines written when the output is not a terminal."""

_console = Console(soft_wrap=True)


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows a bar with count, elapsed and remaining time when enabled (progress lines when
    the output is not a terminal)."""
    if enabled and not _console.is_terminal:
        with _progress_lines(description, total) as advance:
            yield advance
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not enabled, transient=False, console=_console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


@contextmanager
def _progress_lines(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """``advance(n)`` for a log: a line at the start, every ``LOG_EVERY`` seconds from a timer thread (also while one
    step takes longer than that), and at the end."""
    start, done, stop = time.monotonic(), [0], threading.Event()

    def line() -> str:
        elapsed = time.monotonic() - start
        left = f", about {_clock(elapsed / done[0] * (total - done[0]))} left" if 0 < done[0] < total else ""
        return f"{description}: {done[0]:,}/{total:,} ({done[0] / max(total, 1):.0%}), {_clock(elapsed)} elapsed{left}"

    def tick() -> None:
        while not stop.wait(LOG_EVERY):
            say(line())

    say(f"{description}: 0/{total:,}")
    timer = threading.Thread(target=tick, name=f"progress {description}", daemon=True)
    timer.start()
    try:
        yield lambda n=1: done.__setitem__(0, done[0] + n)
    finally:
        stop.set()
        timer.join()
    say(line())


def say(message: str, enabled: bool = True) -> None:
    """Print one line of what a run is doing (shown with its progress bars, silenced with them)."""
    if enabled:
        _console.print(message, markup=False, highlight=False)
