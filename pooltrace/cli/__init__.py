"""The ``pooltrace`` command line: a click group listing one module per verb.

Commands are loaded lazily: ``pooltrace --help`` imports none of them (their one-line help is listed in
SHORT_HELP, checked against the commands by a test), and ``pooltrace VERB`` imports only VERB's module, so
pyarrow, numpy and rich are loaded only by the commands that use them.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import sys
import threading

import click

from pooltrace import __version__
from pooltrace.cli.common import PooltraceGroup, closed_pipe, encoding_fallbacks, verbose_option

# command -> the module defining it (modules stay importable under their own names)
COMMANDS = {"info": "info", "pair": "pair", "report": "report", "tags": "tags", "diff": "diff", "whose": "whose",
            "record": "record", "stop": "record", "profile": "record", "trend": "trend", "doctor": "doctor"}
SHORT_HELP = {
    "diff": "Compare outstanding allocations of BASE and NEW (.etl files or datasets, e.g. before and after a fix).",
    "doctor": "Check that this machine can record pool traces with stacks (Windows 8.1+, x64, elevated).",
    "info": "OS build, CPUs, clock, duration, events by kind, losses, pool tracing/stack status, and a verdict.",
    "pair": "Match every pool allocation with its free, attach stacks, and write allocations.parquet, "
            "stacks.parquet, modules.parquet and trace.json (schema in the README).",
    "profile": "Write a WPR profile (.wprp) with the settings `pooltrace record` uses, for recording with WPR.",
    "record": "Record kernel pool allocations with their stacks into OUT.etl (Windows 8.1+, x64, elevated).",
    "report": "Outstanding pool allocations (allocated inside the window, not freed by its end — WPA's AIFO), "
              "grouped and symbolized.",
    "stop": "Stop every pooltrace recording session still running: one left by a killed `pooltrace record`, or "
            "one that outlived a logoff or shutdown (Windows, elevated).",
    "tags": "Per tag and pool type: allocs, frees, diff, outstanding bytes, bytes per alloc, owner modules (from "
            "the allocating stacks) and the pooltag.txt description.",
    "trend": "Outstanding bytes per group across RUNs in order (.etl files, datasets, or a run STORE with --run or "
             "--label).",
    "whose": "Who owns pool tag TAG: call sites in a trace (PATH: a .etl or a dataset directory), the user's "
             "pooltag.txt, and the driver files holding the tag (PATH: directories or files to scan).",
}


# commands that read traces or datasets with pyarrow but build no pandas DataFrame (`pair` answers the probe
# itself, after it has started its decode workers' server: it loads pyarrow as late as it can)
ARROW_COMMANDS = {"info", "report", "tags", "diff", "whose"}


class LazyGroup(PooltraceGroup):
    """A group whose commands are imported when used, not when the group is built."""

    def list_commands(self, ctx: click.Context | None) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context | None, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            if cmd_name in ARROW_COMMANDS:
                from pooltrace.arrowprobe import skip_pandas_probe

                skip_pandas_probe()
            module = importlib.import_module(f"pooltrace.cli.{COMMANDS[cmd_name]}")
            self.add_command(getattr(module, cmd_name))
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = [(n, click.utils.make_default_short_help(SHORT_HELP[n], limit)) for n in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pooltrace")
@verbose_option
def cli() -> None:
    """Find Windows kernel pool leaks down to the call stack, from .etl traces, on any OS.

    Exit codes: 0 ok, 1 a check failed, 2 bad input or usage (one line on stderr; --verbose for detail).

    \b
    Example:
      pooltrace report traces/sample-leak.etl
    """


def main() -> None:
    single_threaded_blas()
    encoding_fallbacks()
    try:
        cli(prog_name="pooltrace")
    except SystemExit as done:  # click's way out of every command, whatever its exit code
        _flush_quietly()
        exit_without_teardown(done.code)  # returns when it cannot
        raise
    finally:
        _flush_quietly()


def exit_without_teardown(code) -> None:
    """End the process at once when the command is over: the exit handlers run and the output is flushed as at
    any exit, but the interpreter's teardown (freeing every object and unloading numpy and pyarrow: 0.1 s of a
    `pair` run, 0.13-0.2 s of CPU) is skipped. Returns, for the normal exit, when that cannot be done safely:
    another thread still runs (it would be cut off, not joined), the exit code is not a number, or this Python
    has no way to run the exit handlers first."""
    run_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_handlers is None or threading.active_count() > 1 or not (code is None or isinstance(code, int)):
        return
    run_handlers()
    _flush_quietly()
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os._exit(code or 0)


def single_threaded_blas() -> None:
    """numpy's OpenBLAS starts a thread per core when numpy is imported, and its threads spin after each matrix
    product; pooltrace's products are small (growth fits), so on a busy pair run those threads only took CPU
    from the decoders (0.1-0.2 s per run on 2 cores). One thread, unless the user set it; the decode workers
    inherit it."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _flush_quietly() -> None:
    """Flush stdout now, so that a reader that already went away ends the run quietly (keeping the exit code)."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        closed_pipe(exit=False)
