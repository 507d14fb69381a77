"""``pooltrace trend RUN...``: outstanding allocations per group across N runs in order, with a status per
group (new, growing, fixed, stable), usable as a CI gate."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pooltrace import api
from pooltrace.analysis import BY, Filters
from pooltrace.cli.common import (
    EXIT_CHECK_FAILED,
    check_output,
    fail,
    force_option,
    progress_bar,
    quiet_option,
    render_text,
    user_errors,
    write_output,
)
from pooltrace.cli.report import common_options, store_options, warn
from pooltrace.compare import parse_threshold
from pooltrace.errors import PooltraceError
from pooltrace.notices import pool_event_count
from pooltrace.reporters import trendout
from pooltrace.trends import DEFAULT_TOLERANCE, build_trend, trend_gate
from pooltrace.verdicts import gate_refusal


@click.command()
@click.argument("runs", metavar="RUN...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--by", type=click.Choice(BY), default="stack", show_default=True)
@common_options
@store_options
@click.option("--tolerance", type=click.FloatRange(min=0), default=DEFAULT_TOLERANCE * 100, show_default=True,
              metavar="PCT", help="A change of a group's bytes within this percentage is no change.")
@click.option("--fail-on-growth", metavar="BYTES|PCT", help="Exit 1 if outstanding bytes of the last run grew by "
              "more than this (4096, 64k, 1.5MB or 10%) against the first run (or --against best).")
@click.option("--against", type=click.Choice(["first", "best"]), default="first", show_default=True,
              help="The run --fail-on-growth compares the last run with: the first, or the one with the fewest "
                   "outstanding bytes.")
@click.option("--per-group", is_flag=True, help="Apply --fail-on-growth to every group too.")
@click.option("--top", type=click.IntRange(min=1), help="Show the N first groups [text: 30, html: 12].")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv", "html"]), default="text",
              show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Write to FILE (atomically; never one of the inputs; an existing FILE needs --force).")
@force_option
@quiet_option
@user_errors
def trend(runs, by, window, tags, pool, pids, modules, min_bytes, symbols, no_symbols, run_ids, labels, tolerance,
          fail_on_growth, against, per_group, top, fmt, output, force, quiet) -> None:
    """Outstanding bytes per group across RUNs in order (.etl files, datasets, or a run STORE with --run or
    --label). Per group: the run where it appears or starts growing, and its status (new in run K, growing
    across runs, shrunk in run K, fixed in run K, stable). Groups are matched as diff matches them."""
    if fail_on_growth:
        parse_threshold(fail_on_growth)
    if per_group and not fail_on_growth:
        raise PooltraceError("--per-group needs --fail-on-growth")
    check_output(output, runs, force)
    reports = api.run_reports(runs, run_ids=run_ids, labels=labels, by=by, window=window,
                              filters=Filters(list(tags), pool, list(pids), list(modules), min_bytes),
                              symbols=symbols, no_symbols=no_symbols, quiet=quiet, warn=warn,
                              progress_for=lambda p: progress_bar(p, quiet, "pairing"))
    if len(reports) < 2:
        raise PooltraceError(f"trend needs at least 2 runs ({len(reports)} given)")
    t = build_trend(reports, tolerance / 100)
    if fmt == "text":  # the terminal's width, no trailing spaces, ASCII boxes where the stream needs them
        render_text(lambda con: trendout.render_text(t, con, top or 30), output)
    else:  # -o: written atomically
        write_output(output, {"json": trendout.to_json, "csv": trendout.to_csv,
                              "html": lambda x: trendout.to_html(x, top)}[fmt](t))
    if fmt == "csv":  # a CSV has no header for them: on stderr, as report and diff do
        for line in trendout.run_notices(t):
            click.echo(f"warning: {line}", err=True)
    if fail_on_growth:
        empty = [f"run {k} ({r.name})" for k, r in enumerate(t.runs, 1) if not pool_event_count(r.report.trace)]
        if empty:  # as diff's gate: a CI gate never passes on a run that recorded nothing
            fail(gate_refusal(empty))
        reason = trend_gate(t, fail_on_growth, against, per_group)
        if reason:
            click.echo(f"FAIL: {reason}", err=True)
            sys.exit(EXIT_CHECK_FAILED)
        click.echo(f"ok: outstanding bytes of the last run did not grow by more than {fail_on_growth} against the "
                   f"{against} run", err=True)
