"""The ``pooltrace`` command line: a click group listing one module per verb."""

from __future__ import annotations

import importlib

import click

from pooltrace import __version__

# module -> the click commands it defines (modules stay importable under their own names)
COMMANDS = {"info": ["info"], "pair": ["pair"], "report": ["report"], "tags": ["tags"], "diff": ["diff"],
            "whose": ["whose"], "record": ["record", "stop", "profile"]}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pooltrace")
def cli() -> None:
    """Find Windows kernel pool leaks down to the call stack, from .etl traces, on any OS.

    Exit codes: 0 ok, 1 a check failed, 2 bad input or usage.
    """


for _module, _names in COMMANDS.items():
    _mod = importlib.import_module(f"pooltrace.cli.{_module}")
    for _name in _names:
        cli.add_command(getattr(_mod, _name))


def main() -> None:
    cli(prog_name="pooltrace")
