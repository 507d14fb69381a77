"""``pooltrace pair TRACE.etl [-o DIR]``: write the Parquet dataset of paired allocations."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pooltrace.cli.common import progress_bar, quiet_option, user_errors
from pooltrace.dataset import DEFAULT_WINDOW_S, default_output, pair_trace


@click.command()
@click.argument("trace", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False),
              help="Dataset directory [default: TRACE's name with .pooltrace, beside it].")
@click.option("--stack-window", type=click.FloatRange(min=0), default=DEFAULT_WINDOW_S, show_default=True,
              help="Seconds of trace time a late stack part (user-mode half) may follow its event.")
@click.option("--json", "as_json", is_flag=True, help="Print trace.json instead of the summary line.")
@quiet_option
@user_errors
def pair(trace: Path, output: Path | None, stack_window: float, as_json: bool, quiet: bool) -> None:
    """Match every pool allocation with its free, attach stacks, and write allocations.parquet,
    stacks.parquet, modules.parquet and trace.json (schema in the README)."""
    out = output or default_output(trace)
    with progress_bar(trace, quiet, "pairing") as progress:
        meta = pair_trace(trace, out, window_s=stack_window, progress=progress)
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
    d = meta["pairing"]
    click.echo(f"{out}: {d['allocs']:,} allocations, {d['frees']:,} frees; outstanding "
               f"{d['outstanding']['count']:,} ({d['outstanding']['bytes']:,} bytes); lost frees {d['lost_free']:,}; "
               f"frees without alloc {d['free_without_alloc']:,}; with stack {d['allocations_with_stack']:,}; "
               f"{d['distinct_stacks']:,} stacks; {meta['modules']:,} modules "
               f"({meta['modules_with_pdb']:,} with PDB id)")
    for note in meta["notes"]:
        click.echo(f"note: {note}")
    for w in meta["warnings"]:
        click.echo(f"warning: {w}", err=True)
    lost = meta["lost"]
    if lost["events"] or lost["buffers"]:
        click.echo(f"warning: {lost['events']:,} events and {lost['buffers']:,} buffers were lost while recording",
                   err=True)
