"""What a run shows while it works: status lines through ``logging`` and progress bars through rich.

Status lines (``say``) are records of the ``personalab`` logger at level INFO. The command line shows them with
``log_to_console`` (plain lines on stdout, parameters written as flags) while a command runs; a Python session that
has not configured logging gets the same handler on the first line, and one that has (``logging.basicConfig``, a
notebook's handler) gets the records where it sends them, at the level it set (``basicConfig``'s default, WARNING,
drops them).

Progress bars are console output, silenced with ``enabled=False``: on a terminal a bar redraws in place; when the
output goes to a file or a pipe (a job's log), where a bar would show nothing until the end, ``progress_bar``
writes a plain line when the work starts, at least every ``LOG_EVERY`` seconds while it runs, and when it ends.
"""

import logging
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
logger = logging.getLogger("personalab")


class ConsoleHandler(logging.Handler):
    """Each record as one plain line on the console (stdout), its message passed through ``rewrite``."""

    def __init__(self, rewrite: Callable[[str], str] | None = None):
        super().__init__(logging.INFO)
        self.rewrite = rewrite or (lambda message: message)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _console.print(self.rewrite(record.getMessage()), markup=False, highlight=False)
        except Exception:
            self.handleError(record)


def log_to_console(rewrite: Callable[[str], str] | None = None) -> Callable[[], None]:
    """Show the ``personalab`` logger's INFO records as plain lines on stdout (replacing an earlier such handler);
    ``rewrite`` edits each message (the command line writes parameters as flags). Returns what puts the logger's
    handlers and level back as they were (the command line calls it when the command ends)."""
    handlers, level = list(logger.handlers), logger.level
    for handler in [h for h in handlers if isinstance(h, ConsoleHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(ConsoleHandler(rewrite))
    logger.setLevel(logging.INFO)

    def restore() -> None:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        for handler in handlers:
            logger.addHandler(handler)
        logger.setLevel(level)

    return restore


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
            _line(line())

    _line(f"{description}: 0/{total:,}")
    timer = threading.Thread(target=tick, name=f"progress {description}", daemon=True)
    timer.start()
    try:
        yield lambda n=1: done.__setitem__(0, done[0] + n)
    finally:
        stop.set()
        timer.join()
    _line(line())


def _line(text: str) -> None:
    _console.print(text, markup=False, highlight=False)


def say(message: str, enabled: bool = True) -> None:
    """Log one line of what a run is doing (INFO on the ``personalab`` logger; silenced with the progress bars).
    Where logging is not configured at all, the console handler is installed first, at INFO unless the logger's own
    level was set."""
    if not enabled:
        return
    if not logger.hasHandlers():
        logger.addHandler(ConsoleHandler())
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    logger.info(message)
