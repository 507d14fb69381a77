"""Shared CLI plumbing: the one error path (one line on stderr, exit code 2, detail with --verbose), quiet
exit on a closed pipe, ASCII fallbacks for consoles that cannot encode a character, output consoles sized
to the terminal, option parsers shared by several commands, and a rich progress bar on stderr."""

from __future__ import annotations

import codecs
import errno
import functools
import io
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Iterable
from contextlib import contextmanager, suppress
from pathlib import Path

import click

from pooltrace.cachetrust import rebuild_damaged_caches
from pooltrace.errors import PooltraceError
from pooltrace.outputs import atomic_open, os_reason, refuse_inputs

PROGRESS_MIN_BYTES = 4 << 20  # no bar for traces smaller than this
EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT = 0, 1, 2
PIPED_WIDTH = 100  # text width when stdout is not a terminal and COLUMNS is not set
VERBOSE_KEY = "pooltrace.verbose"

_stderr = None


def stderr_console():
    """The rich console on stderr, made on first use (rich is imported only by commands that draw)."""
    global _stderr
    if _stderr is None:
        from rich.console import Console

        _stderr = Console(stderr=True, highlight=False)
    return _stderr

# ---- characters a legacy console cannot encode -------------------------------------------------------

ASCII_FALLBACK = {"Δ": "d", "—": "-", "–": "-", "…": "...", "×": "x", "→": "->", "←": "<-", "≤": "<=", "≥": ">=",
                  "•": "*", "“": '"', "”": '"', "‘": "'", "’": "'", "µ": "u", "\u00a0": " "}


def _ascii_fallback(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    bad = exc.object[exc.start:exc.end]
    return "".join(ASCII_FALLBACK.get(c, "?") for c in bad), exc.end


codecs.register_error("pooltrace-ascii", _ascii_fallback)


def encoding_fallbacks() -> None:
    """stdout and stderr substitute ASCII for what their encoding (cp1252 when Windows redirects) cannot
    hold, instead of failing with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        enc = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if hasattr(stream, "reconfigure") and not enc.startswith("utf"):
            with suppress(ValueError, OSError):
                stream.reconfigure(errors="pooltrace-ascii")


# ---- the one error path ------------------------------------------------------------------------------

def verbose() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().meta.get(VERBOSE_KEY))


def _set_verbose(ctx: click.Context, _param, value: bool) -> None:
    if value:
        ctx.find_root().meta[VERBOSE_KEY] = True


verbose_option = click.option("--verbose", is_flag=True, expose_value=False, is_eager=True, callback=_set_verbose,
                              help="On an error, print its full detail (and the traceback) after the one line.")


def fail(message: str, code: int = EXIT_BAD_INPUT, detail: str | None = None) -> None:
    """One line on stderr (the rest of a multi-line message only with --verbose), then exit `code`."""
    first, _, rest = str(message).strip().partition("\n")
    more = "\n".join(x for x in (rest.strip(), detail) if x)
    if more and not verbose():
        first += " (--verbose for detail)"
    click.echo(f"pooltrace: error: {first}", err=True)
    if more and verbose():
        click.echo(more, err=True)
    sys.exit(code)


def closed_pipe(exit: bool = True) -> None:
    """The reader of stdout went away (`| head -1`): stop quietly with exit 0, like other command-line tools."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    if exit:
        sys.exit(EXIT_OK)


def handle_error(exc: BaseException) -> None:
    """Exit for an error that reached the command line: PooltraceError and OSError as one line (exit 2)."""
    if isinstance(exc, BrokenPipeError) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE):
        closed_pipe()
    tb = "".join(traceback.format_exception(exc)) if verbose() else None
    if isinstance(exc, PooltraceError):
        fail(str(exc), detail=tb)
    if isinstance(exc, MemoryError):
        fail("out of memory", detail=tb)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        fail(f"{where}{os_reason(exc)}", detail=tb)
    raise exc


def user_errors(func: Callable) -> Callable:
    """Turn PooltraceError and OSError into a one-line message and exit code 2, a closed pipe into a quiet
    exit 0; adds the command's --verbose option."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return rebuild_damaged_caches(lambda: func(*args, **kwargs), _note_rebuild)
        except (PooltraceError, OSError, MemoryError) as exc:
            handle_error(exc)

    return verbose_option(wrapper)


def _note_rebuild(message: str) -> None:
    click.echo(f"note: {message}", err=True)


class PooltraceGroup(click.Group):
    """The top-level group: the same error path for anything a command lets through."""

    def invoke(self, ctx: click.Context):
        encoding_fallbacks()
        try:
            return super().invoke(ctx)
        except (PooltraceError, OSError, MemoryError) as exc:
            handle_error(exc)


# ---- output ------------------------------------------------------------------------------------------

def text_width() -> int:
    """COLUMNS, else the terminal's width, else 100 when stdout is not a terminal."""
    cols = os.environ.get("COLUMNS", "")
    if cols.isdigit() and int(cols) >= 40:
        return int(cols)
    if sys.stdout.isatty():
        return max(40, shutil.get_terminal_size((PIPED_WIDTH, 24)).columns)
    return PIPED_WIDTH


class _Buffer(io.StringIO):
    """Collects rendered text; reports the encoding of the stream it is meant for, so that rich picks ASCII
    boxes for a console that cannot show line-drawing characters."""

    def __init__(self, encoding: str) -> None:
        super().__init__()
        self._encoding = encoding

    @property
    def encoding(self) -> str:
        return self._encoding


def render_text(draw: Callable, output: Path | None = None, width: int | None = None) -> None:
    """Run `draw(console)` and write its text to `output` (atomically) or stdout: the terminal's width, no
    ANSI codes, no trailing spaces."""
    from rich.console import Console

    enc = "utf-8" if output is not None else (getattr(sys.stdout, "encoding", None) or "utf-8")
    buf = _Buffer(enc)
    con = Console(file=buf, width=width or (PIPED_WIDTH if output is not None else text_width()), highlight=False,
                  color_system=None, force_terminal=False, soft_wrap=False, emoji=False)
    draw(con)
    lines = [line.rstrip() for line in buf.getvalue().splitlines()]
    write_output(output, "\n".join(lines) + ("\n" if lines else ""))


def check_output(output: Path | None, inputs: Iterable[Path], force: bool = False) -> None:
    """Before any work is done: refuse `-o FILE` that resolves to an input (even with --force), and a FILE
    that exists unless `force` (pooltrace never replaces a file it was not told it may replace)."""
    if output is None:
        return
    refuse_inputs(output, inputs)
    if not force and os.path.lexists(output):
        raise PooltraceError(f"-o {output}: exists; pass --force to replace it")


force_option = click.option("--force", is_flag=True,
                            help="Replace the -o FILE if it exists (never an input; the old file stays until "
                                 "the new one is complete).")


def write_output(output: Path | None, data: str | bytes) -> None:
    if output is None:
        click.echo(data, nl=False)
        return
    with atomic_open(output, "wb" if isinstance(data, bytes) else "w") as fh:
        fh.write(data)


# ---- options shared by several commands --------------------------------------------------------------

def size_option_value(_ctx, param, value):
    """Click callback: a byte size (4096, 64k, 1.5MB) as an int, using the one size parser."""
    if value is None or isinstance(value, int):
        return value
    from pooltrace.sizes import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def tag_values(_ctx, _param, values):
    """Click callback: every --tag checked by the one pool-tag parser `whose` uses for its TAG (1 to 4
    single-byte characters, \\xNN escapes, ? and * wildcards)."""
    if not values:  # no --tag: the parser's module (and pyarrow.compute) is not loaded
        return values
    from pooltrace.owners import tag_slots

    for v in values:
        try:
            tag_slots(v)
        except PooltraceError as exc:
            raise click.BadParameter(str(exc)) from None
    return values


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

    bar_console = Console(stderr=True, force_terminal=True) if forced else stderr_console()
    with Progress(TextColumn(f"{label} {path.name}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeRemainingColumn(), console=bar_console, transient=not forced) as bar:
        task = bar.add_task(label, total=1)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _forced() -> bool:
    """POOLTRACE_PROGRESS=1 shows the bar even when stderr is not a terminal (CI logs)."""
    return bool(os.environ.get("POOLTRACE_PROGRESS"))


quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
