"""``pooltrace pair TRACE.etl [-o DIR]``: write the Parquet dataset of paired allocations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from pooltrace.cli.common import progress_bar, quiet_option, user_errors
from pooltrace.errors import PooltraceError
from pooltrace.etl.workerstart import start_for
from pooltrace.outputs import check_parent
from pooltrace.pairoptions import DEFAULT_WINDOW_S

MAX_STACK_WINDOW_S = 3600.0


def _stack_window(_ctx, _param, value: float) -> float:
    if not math.isfinite(value) or not 0 <= value <= MAX_STACK_WINDOW_S:
        raise click.BadParameter(f"{value} is not a number of seconds from 0 to {MAX_STACK_WINDOW_S:g}")
    return value


@click.command(epilog="Example: pooltrace pair traces/sample-leak.etl -o /tmp/leak.pooltrace")
@click.argument("trace", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False),
              help="Dataset directory [default: TRACE's name with .pooltrace, beside it]. Must be new, empty or "
                   "an earlier pooltrace dataset (its dataset files are replaced, nothing else is touched).")
@click.option("--stack-window", type=float, default=DEFAULT_WINDOW_S, show_default=True, callback=_stack_window,
              help="Seconds of trace time a late stack part (user-mode half) may follow its event.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text: one summary line; json: trace.json.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("--into", "store", type=click.Path(path_type=Path, file_okay=False),
              help="Append the run to this run STORE (Hive-partitioned Parquet; created when new) instead.")
@click.option("--run-id", help="The run's ID in the STORE [default: UTC time, trace name and a random suffix].")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Label the run in the STORE (build=1234, machine=lab7). Repeatable.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None,
              help="Processes decoding the trace, at most the processors available [default: the processors "
                   "available; 1 for traces under 128 MB]. The dataset is the same for every value.")
@quiet_option
@user_errors
def pair(trace: Path, output: Path | None, stack_window: float, fmt: str, as_json: bool, store: Path | None,
         run_id: str | None, labels: tuple[str, ...], jobs: int | None, quiet: bool) -> None:
    """Match every pool allocation with its free, attach stacks, and write allocations.parquet,
    stacks.parquet, modules.parquet and trace.json (schema in the README)."""
    as_json = as_json or fmt == "json"
    if store is None and (run_id or labels):
        raise PooltraceError("--run-id and --label need --into STORE")
    if store is not None and output is not None:
        raise PooltraceError("give -o DIR or --into STORE, not both")
    # the decode workers' server first: it imports the decoders on another core while this process imports
    # the pairing code below (numpy, pyarrow: ~0.2 s each)
    start_for(trace, jobs)
    from pooltrace.arrowprobe import skip_pandas_probe

    skip_pandas_probe()
    if store is not None:
        from pooltrace.store import parse_labels

        _into(trace, store, run_id, parse_labels(labels), stack_window, as_json, quiet)
        return
    from pooltrace.dataset import pair_trace
    from pooltrace.datasetschema import default_output

    out = (output or default_output(trace)).absolute()
    check_parent(out)
    with progress_bar(trace, quiet, "pairing") as progress:
        meta = pair_trace(trace, out, window_s=stack_window, progress=progress, jobs=jobs)
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


def _into(trace: Path, store: Path, run_id: str | None, labels: dict, stack_window: float, as_json: bool,
          quiet: bool) -> None:
    from pooltrace.store import append_trace, check_run_id

    if run_id is not None:
        check_run_id(run_id)
    if not trace.is_file():
        raise PooltraceError(f"{trace}: no such file")
    with progress_bar(trace, quiet, "pairing") as progress:
        row = append_trace(store, trace, run_id=run_id, labels=labels, window_s=stack_window, progress=progress)
    if as_json:
        click.echo(json.dumps({k: v for k, v in row.items() if k != "modules"}, indent=2, default=str))
        return
    click.echo(f"{store}: run {row['run_id']} added ({row['allocations']:,} allocations, "
               f"{row['outstanding_count']:,} outstanding, {row['outstanding_bytes']:,} bytes)"
               + (f" labels {', '.join(f'{k}={v}' for k, v in row['labels'].items())}" if row["labels"] else ""))
    if row["events_lost"]:
        click.echo(f"warning: {row['events_lost']:,} events were lost while recording", err=True)
