"""The ``pooltrace`` command line: a click group listing one module per verb."""

from __future__ import annotations

import click

from pooltrace import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pooltrace")
def cli() -> None:
    """Find Windows kernel pool leaks down to the call stack, from .etl traces, on any OS.

    Exit codes: 0 ok, 1 a check failed, 2 bad input or usage.
    """


from pooltrace.cli.diff import diff  # noqa: E402 - commands register after the group exists
from pooltrace.cli.info import info  # noqa: E402
from pooltrace.cli.pair import pair  # noqa: E402
from pooltrace.cli.report import report  # noqa: E402
from pooltrace.cli.tags import tags  # noqa: E402

cli.add_command(info)
cli.add_command(diff)
cli.add_command(pair)
cli.add_command(report)
cli.add_command(tags)


def main() -> None:
    cli(prog_name="pooltrace")
