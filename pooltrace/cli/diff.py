"""``pooltrace diff BASE NEW``: stack-level leak comparison of two runs, usable as a CI gate."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from pooltrace import api
from pooltrace.analysis import BY, Filters, open_input
from pooltrace.cli.common import EXIT_CHECK_FAILED, progress_bar, quiet_option, user_errors
from pooltrace.cli.report import common_options, store_input, store_options, warn
from pooltrace.compare import diff_reports, gate, parse_threshold
from pooltrace.errors import PooltraceError
from pooltrace.reporters import diffout


@click.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path), required=False)
@click.option("--by", type=click.Choice(BY), default="stack", show_default=True)
@common_options
@store_options
@click.option("--normalize", type=click.Choice(["duration", "allocs"]), is_flag=False, flag_value="duration",
              help="Scale BASE to NEW's duration (--normalize) or allocation count (--normalize=allocs).")
@click.option("--fail-on-growth", metavar="BYTES|PCT", help="Exit 1 if outstanding bytes grew by more than this "
              "(4096, 64k, 1.5MB or 10%).")
@click.option("--per-group", is_flag=True, help="Apply --fail-on-growth to every group too.")
@click.option("--top", type=click.IntRange(min=1), help="Show the N biggest changes [text: 30].")
@click.option("--growth", "show_growth", is_flag=True,
              help="Also show each side's growth class and bytes/s per group (text, json, csv).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv", "html", "pprof"]), default="text",
              show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="Write to FILE.")
@quiet_option
@user_errors
def diff(base, new, by, window, tags, pool, pids, modules, min_bytes, symbols, no_symbols, run_ids, labels, normalize,
         fail_on_growth, per_group, top, show_growth, fmt, output, quiet) -> None:
    """Compare outstanding allocations of BASE and NEW (.etl files or datasets, e.g. before and after a
    fix). Groups are matched by module-relative frames, never by address. Runs of a run STORE: give the
    STORE and pick two runs with --run/--label (NEW omitted)."""
    if fail_on_growth:
        parse_threshold(fail_on_growth)  # reject a bad threshold before the work
    if per_group and not fail_on_growth:
        raise PooltraceError("--per-group needs --fail-on-growth")
    if fmt == "pprof" and output is None:
        raise PooltraceError("--format pprof is binary: give -o FILE")
    filters = Filters(list(tags), pool, list(pids), list(modules), min_bytes)
    reports = []
    for path in store_input([base] + ([new] if new is not None else []), run_ids, labels, 2):
        with progress_bar(path, quiet, "pairing") as progress:
            ds = open_input(path, progress=progress)
        reports.append(api.analyze(ds, path, by=by, window=window, filters=filters, symbols=symbols,
                                   no_symbols=no_symbols, quiet=quiet, warn=warn)[0])
    d = diff_reports(reports[0], reports[1], normalize)
    if fmt == "text":
        if output:
            with open(output, "w", encoding="utf-8") as fh:
                diffout.render_text(d, Console(width=100, highlight=False, file=fh, color_system=None), top or 30,
                                    show_growth)
        else:
            diffout.render_text(d, Console(width=100, highlight=False), top or 30, show_growth)
    elif fmt == "pprof":
        output.write_bytes(diffout.to_pprof(d))
    else:
        text = diffout.to_html(d) if fmt == "html" else {"json": diffout.to_json, "csv": diffout.to_csv}[fmt](
            d, show_growth)
        if output:
            output.write_text(text, encoding="utf-8")
        else:
            click.echo(text, nl=False)
    if fail_on_growth:
        reason = gate(d, fail_on_growth, per_group)
        if reason:
            click.echo(f"FAIL: {reason}", err=True)
            sys.exit(EXIT_CHECK_FAILED)
        click.echo(f"ok: outstanding bytes did not grow by more than {fail_on_growth}", err=True)
