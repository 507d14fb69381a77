"""``pooltrace diff BASE NEW``: stack-level leak comparison of two runs, usable as a CI gate."""

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
from pooltrace.cli.report import (
    check_filters,
    check_symbol_options,
    check_window,
    common_options,
    notices_of,
    say_notices,
    store_input,
    store_options,
    warn,
)
from pooltrace.compare import diff_reports, gate, parse_threshold
from pooltrace.datasetopen import open_input
from pooltrace.errors import PooltraceError
from pooltrace.notices import pool_event_count
from pooltrace.reporters import diffout
from pooltrace.verdicts import gate_refusal


@click.command(epilog="Example: pooltrace diff traces/sample-leak.etl traces/sample-leak-fixed.etl "
                      "--by function --fail-on-growth 64k")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path), required=False)
@click.option("--by", type=click.Choice(BY), default="stack", show_default=True,
              help="Group both sides by allocating stack, call site, module or tag (as `report --by`).")
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
              show_default=True, help="Output format (pprof needs -o).")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Write to FILE (atomically; never one of the inputs; an existing FILE needs --force).")
@force_option
@quiet_option
@user_errors
def diff(base, new, by, window, tags, pool, pids, modules, min_bytes, symbols, no_symbols, run_ids, labels, normalize,
         fail_on_growth, per_group, top, show_growth, fmt, as_json, output, force, quiet) -> None:
    """Compare outstanding allocations of BASE and NEW (.etl files or datasets, e.g. before and after a
    fix). Groups are matched by module-relative frames, never by address. Runs of a run STORE: give the
    STORE and pick two runs with --run/--label (NEW omitted)."""
    fmt = "json" if as_json else fmt
    if fail_on_growth:
        parse_threshold(fail_on_growth)  # reject a bad threshold before the work
    if per_group and not fail_on_growth:
        raise click.UsageError("--per-group needs --fail-on-growth")
    if fmt == "pprof" and output is None:
        raise PooltraceError("--format pprof is binary: give -o FILE")
    check_symbol_options(symbols, no_symbols)
    check_output(output, [p for p in (base, new) if p is not None], force)
    filters = Filters(list(tags), pool, list(pids), list(modules), min_bytes)
    datasets = []
    paths = store_input([base] + ([new] if new is not None else []), run_ids, labels, 2)
    for path in paths:
        with progress_bar(path, quiet, "pairing") as progress:
            datasets.append(open_input(path, progress=progress))
    check_filters(datasets, filters)
    reports = []
    for path, ds, label in zip(paths, datasets, ("BASE", "NEW"), strict=True):
        check_window(window, ds)
        rep, render = api.analyze(ds, path, by=by, window=window, filters=filters, symbols=symbols,
                                  no_symbols=no_symbols, quiet=quiet, warn=warn)
        rep.notices = notices_of(ds, render)
        if fmt in ("csv", "pprof"):  # formats without a header: on stderr
            say_notices(ds.trace, label)
        reports.append(rep)
    d = diff_reports(reports[0], reports[1], normalize)
    no_events = [label for label, ds in zip(("BASE", "NEW"), datasets, strict=True) if not pool_event_count(ds.trace)]
    if fail_on_growth and no_events:
        gate_result = {"threshold": fail_on_growth, "per_group": per_group, "passed": False,
                       "reason": gate_refusal(no_events, " and ")}
    elif fail_on_growth:
        reason = gate(d, fail_on_growth, per_group)
        gate_result = {"threshold": fail_on_growth, "per_group": per_group, "passed": reason is None,
                       "reason": reason}
    else:
        gate_result = None
    show = top or (30 if fmt == "text" else None)
    if fmt == "text":
        render_text(lambda con: diffout.render_text(d, con, show, show_growth), output)
    elif fmt == "pprof":
        write_output(output, diffout.to_pprof(d))
    elif fmt == "json":
        write_output(output, diffout.to_json(d, gate_result, show, show_growth))
    elif fmt == "csv":
        write_output(output, diffout.to_csv(d, show_growth))
    else:
        write_output(output, diffout.to_html(d))
    if gate_result is not None:
        if no_events:
            fail(gate_result["reason"])
        if not gate_result["passed"]:
            click.echo(f"FAIL: {gate_result['reason']}", err=True)
            sys.exit(EXIT_CHECK_FAILED)
        click.echo(f"ok: outstanding bytes did not grow by more than {fail_on_growth}", err=True)
