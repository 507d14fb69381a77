"""Shared CLI plumbing: one-line errors with exit code 2, a rich progress bar on stderr."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import click

from pooltrace.errors import PooltraceError

PROGRESS_MIN_BYTES = 4 << 20  # no bar for traces smaller than this
EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2

_stderr = None


def stderr_console():
    """The rich console on stderr, made on first use (rich is imported only by commands that draw)."""
    global _stderr
    if _stderr is None:
        from rich.console import Console

        _stderr = Console(stderr=True, highlight=False)
    return _stderr


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"pooltrace: error: {message}", err=True)
    sys.exit(code)


def user_errors(func: Callable) -> Callable:
    """Turn PooltraceError into a one-line message and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except PooltraceError as exc:
            fail(str(exc))
        except MemoryError:
            fail("out of memory")

    return wrapper


@contextmanager
def progress_bar(path: Path, quiet: bool, label: str):
    """Yield a progress(done, total) callback; a bar is shown for large traces unless quiet."""
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    forced = _forced()
    if quiet or size < PROGRESS_MIN_BYTES or not (forced or stderr_console().is_terminal):
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True, force_terminal=True) if forced else stderr_console()
    with Progress(TextColumn(f"{label} {path.name}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeRemainingColumn(), console=console, transient=not forced) as bar:
        task = bar.add_task(label, total=1)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _forced() -> bool:
    """POOLTRACE_PROGRESS=1 shows the bar even when stderr is not a terminal (CI logs)."""
    return bool(os.environ.get("POOLTRACE_PROGRESS"))


quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
