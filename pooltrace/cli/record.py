"""``pooltrace record``, ``pooltrace stop`` and ``pooltrace profile``: recording kernel pool traces.

``record`` and ``stop`` need Windows and check that first; ``profile`` (a WPR profile with the same
settings) works everywhere. Nothing Windows-specific is imported until the platform check has passed, and
nothing here pulls pyarrow, numpy or the report stack (the trace reader is imported at stop time only).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pooltrace.cli import common
from pooltrace.cli.common import quiet_option, user_errors
from pooltrace.collector import NOT_WINDOWS
from pooltrace.collector.config import constants
from pooltrace.errors import PooltraceError

if TYPE_CHECKING:  # the recorder is imported by the commands, not for `pooltrace record --help`
    from pooltrace.collector.recorder import LiveStatus, RecordResult

STOPPED_BY = {"ctrl-c": "Ctrl+C", "ctrl-break": "Ctrl+Break", "duration": "--duration",
              "command": "the command exiting", "console-close": "the console closing",
              "stopped-elsewhere": "`pooltrace stop`", "error": "an error"}
TAG_HELP = ("Record only pool tags matching TAG (up to 4 times), written as poolmon prints them; case-sensitive; "
            "'?' matches one character, a final '*' the rest. Tags shorter than 4 characters are padded with spaces.")


def windows_api():
    """The Windows boundary, or the one-line error on any other OS (before anything else happens)."""
    if sys.platform != "win32":
        raise PooltraceError(NOT_WINDOWS)
    from pooltrace.collector.winapi import WinApi

    return WinApi()


class LiveUi:
    """The live status line on stderr (rich), shown only on a terminal and without --quiet."""

    def __init__(self, quiet: bool):
        from rich.live import Live  # rich only when recording, not for --help
        from rich.text import Text

        self._text = Text
        stderr = common.stderr_console()
        self.live = Live(Text(""), console=stderr, transient=True, auto_refresh=False) \
            if not quiet and stderr.is_terminal else None

    def __enter__(self) -> LiveUi:
        if self.live:
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.live.stop()

    def tick(self, status: LiveStatus) -> None:
        from pooltrace.collector.recorder import status_line

        if self.live:
            self.live.update(self._text(status_line(status)), refresh=True)

    def warning(self, text: str) -> None:
        if self.live:
            self.live.console.print(f"warning: {text}", markup=False, highlight=False)
        else:
            click.echo(f"warning: {text}", err=True)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def summary_lines(r: RecordResult) -> list[str]:
    from pooltrace.collector.recorder import size_text

    lost = (f"events lost {r.stats.events_lost:,}, buffers lost "
            f"{r.stats.log_buffers_lost + r.stats.real_time_buffers_lost:,}" if r.stats else "losses unknown")
    lines = [f"wrote {r.output}: {size_text(r.file_bytes)} in {_clock(r.seconds)} "
             f"(stopped by {STOPPED_BY.get(r.stopped_by, r.stopped_by)}); {lost}"]
    if r.sidecar:
        tags = ", ".join(t.text for t in r.plan.tags) or "every tag"
        unread = f" ({r.module_errors:,} could not be read)" if r.module_errors else ""
        drivers = "driver" if r.modules == 1 else "drivers"
        lines.append(f"wrote {r.sidecar}: {r.modules:,} {drivers} with a PDB identity{unread}; "
                     f"pool tag counters at start and stop for {tags}")
    if r.command_exit_code is not None:
        lines.append(f"the command exited with code {r.command_exit_code}")
    if r.command_running_pid is not None:
        lines.append(f"the command is still running (pid {r.command_running_pid})")
    lines.append(f"next: pooltrace info {r.output}; pooltrace pair {r.output}")
    return lines


MAX_SIZE_DEFAULT = constants()["disk"]["default_max_size_mb"]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), metavar="OUT.etl",
              help="The trace to write (required); OUT.etl.pooltrace.json is written beside it.")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help=TAG_HELP)
@click.option("--free-stacks", is_flag=True,
              help="Also walk the stack of every free (PoolFree, PoolFreeSession); doubles the trace size.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), metavar="S",
              help="Stop after S seconds [default: at Ctrl+C, or when COMMAND exits].")
@click.option("--circular", is_flag=True, help="Keep only the last --max-size MB (for long runs).")
@click.option("--max-size", type=click.IntRange(min=1), metavar="MB",
              help="Largest trace file; with --circular the size it wraps at, otherwise logging stops there "
                   f"[default: {MAX_SIZE_DEFAULT}, so a forgotten session cannot fill the disk].")
@click.option("--buffer-size", type=click.IntRange(4, 16384), metavar="KB", help="ETW buffer size [default: 1024].")
@click.option("--buffers", type=click.IntRange(min=2), metavar="N", help="Most ETW buffers [default: 512].")
@click.option("--kernel-logger", is_flag=True,
              help="Use the NT Kernel Logger instead of a private system logger; it collides with WPR, xperf and "
                   "Process Monitor.")
@click.option("--force", is_flag=True,
              help="Overwrite OUT.etl if it exists, and stop a pooltrace session left running first.")
@quiet_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[-- COMMAND [ARGS]...]")
@user_errors
def record(output: Path | None, tags: tuple[str, ...], free_stacks: bool, duration: float | None, circular: bool,
           max_size: int | None, buffer_size: int | None, buffers: int | None, kernel_logger: bool, force: bool,
           quiet: bool, command: tuple[str, ...]) -> None:
    """Record kernel pool allocations with their stacks into OUT.etl (Windows 8.1+, x64, elevated).

    Runs until Ctrl+C, until --duration, or, given `-- COMMAND ARGS`, while COMMAND runs. Also writes
    OUT.etl.pooltrace.json: each loaded driver's PDB identity and the kernel's per-tag counters at start and
    stop. Analyze the result on any OS with `pooltrace info` and `pooltrace pair`.
    """
    api = windows_api()
    if output is None:
        raise PooltraceError("-o OUT.etl is required")
    from pooltrace.collector.plan import RecordRequest
    from pooltrace.collector.recorder import Recorder

    request = RecordRequest(output=output, tags=tags, free_stacks=free_stacks, kernel_logger=kernel_logger,
                            circular=circular, max_size_mb=max_size, duration_s=duration, command=command,
                            buffer_size_kb=buffer_size, buffers=buffers, force=force)
    with LiveUi(quiet) as ui:
        try:
            result = Recorder(api, request, ui).run()
        except KeyboardInterrupt:
            raise PooltraceError("interrupted before the recording started; nothing was written") from None
    for line in summary_lines(result):
        click.echo(line)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--kernel-logger", is_flag=True,
              help="Also stop the NT Kernel Logger, whichever tool started it.")
@user_errors
def stop(kernel_logger: bool) -> None:
    """Stop every pooltrace recording session still running: one left by a killed `pooltrace record`, or
    one that outlived a logoff or shutdown (Windows, elevated)."""
    api = windows_api()
    from pooltrace.collector.stop import stop_sessions

    for r in stop_sessions(api, kernel_logger):
        click.echo(f"stopped {r.name}: events lost {r.stats.events_lost:,}, buffers lost "
                   f"{r.stats.log_buffers_lost + r.stats.real_time_buffers_lost:,}")
        if r.renamed_to:
            click.echo(f"trace: {r.renamed_to} (without sidecar: no driver PDB identities, no tag baseline)")
        elif r.trace:
            click.echo(f"trace: {r.trace}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False, allow_dash=True), default="-",
              show_default=True, metavar="FILE.wprp", help="Where to write the profile ('-' = stdout).")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help=TAG_HELP)
@click.option("--free-stacks", is_flag=True, help="Also collect stacks of frees (doubles the trace size).")
@user_errors
def profile(output: Path, tags: tuple[str, ...], free_stacks: bool) -> None:
    """Write a WPR profile (.wprp) with the settings `pooltrace record` uses, for recording with WPR."""
    from pooltrace.collector.tagfilter import parse_patterns
    from pooltrace.collector.wprp import build_profile

    xml = build_profile(parse_patterns(tags), free_stacks)
    if str(output) == "-":
        click.echo(xml, nl=False)
        return
    _check_profile_path(output)
    from pooltrace.outputs import atomic_write

    atomic_write(output, xml)
    click.echo(f"wrote {output}; record with: wpr -start {output}!pooltrace -filemode, reproduce, "
               "then: wpr -stop OUT.etl", err=True)


def _check_profile_path(path: Path) -> None:
    """An existing file is replaced only when it is a profile pooltrace wrote (`profile -o t.etl` replaced the
    trace with XML)."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        with open(path, "rb") as fh:
            ours = path.is_file() and b'Author="pooltrace"' in fh.read(4096)
    except OSError:
        ours = False
    if not ours:
        raise PooltraceError(f"{path} exists and is not a profile written by pooltrace: choose another file")
