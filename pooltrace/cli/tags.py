"""``pooltrace tags INPUT``: the poolmon view of a trace, sorted by outstanding bytes like `poolmon -b`."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from pooltrace import pooltypes
from pooltrace.analysis import Filters, tag_rows
from pooltrace.cli.common import (
    force_option,
    progress_bar,
    quiet_option,
    render_text,
    tag_values,
    user_errors,
    write_output,
)
from pooltrace.cli.report import check_filters, check_output, check_window, make_symbolizer
from pooltrace.datasetopen import open_input
from pooltrace.frames import FrameRenderer
from pooltrace.notices import pool_verdict, trace_warnings
from pooltrace.reporters.text import hidden_line, say
from pooltrace.symbols.pooltag import find_pooltag, load_pooltag
from pooltrace.tags import builtin_description


def _descriptions(pooltag: Path | None):
    """Tag descriptions from the user's pooltag.txt (given, or where Debugging Tools install it)."""
    path = pooltag or find_pooltag()
    return load_pooltag(path) if path else None


@click.command(epilog="Example: pooltrace tags traces/sample-leak.etl --top 5")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--window", help="START:END in seconds or ns, either side optional.")
@click.option("--tag", "tags", multiple=True, callback=tag_values,
              help="Only these tags (? and * wildcards). Repeatable.")
@click.option("--pool", type=click.Choice(pooltypes.FILTERS),
              help="paged, nonpaged (NX or not), nx (non-paged NX) or session pool.")
@click.option("--pid", "pids", type=int, multiple=True, help="Allocating process id. Repeatable.")
@click.option("--pooltag", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="pooltag.txt for descriptions [default: the Debugging Tools' copy if installed].")
@click.option("--symbols", help="Symbol path for owner modules (not needed: owners are module names).")
@click.option("--top", type=click.IntRange(min=1), help="Show the first N rows (a footer counts the rest).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text: a poolmon-like table; json: an object with trace, window and rows.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Write to FILE (atomically; never one of the inputs; an existing FILE needs --force).")
@force_option
@quiet_option
@user_errors
def tags(input_path: Path, window, tags, pool, pids, pooltag, symbols, top, fmt, as_json, output, force, quiet) -> None:
    """Per tag and pool type: allocs, frees, diff, outstanding bytes, bytes per alloc, owner modules
    (from the allocating stacks) and the pooltag.txt description."""
    check_output(output, [input_path], force)
    with progress_bar(input_path, quiet, "pairing") as progress:
        ds = open_input(input_path, progress=progress)
    win = check_window(window, ds)
    filters = Filters(list(tags), pool, list(pids))
    check_filters([ds], filters)
    render = FrameRenderer(ds, make_symbolizer(ds, symbols, True, input_path, True))
    every = tag_rows(ds, win, filters, render)
    rows = every[:top]
    hidden = every[len(rows):]
    hidden_bytes = sum(r.outstanding_bytes for r in hidden)
    desc = _descriptions(pooltag)

    def describe(tag: str) -> str | None:  # the user's pooltag.txt first, then the kernel's own tags
        return (desc.describe(tag) if desc is not None else None) or builtin_description(tag)

    verdict, warnings = pool_verdict(ds.trace), trace_warnings(ds.trace)
    if as_json or fmt == "json":
        from pooltrace.reporters.structured import trace_summary_of

        data = {"trace": trace_summary_of(ds.trace), "window": {"start_ns": win.start_ns, "end_ns": win.end_ns},
                "verdict": verdict, "warnings": warnings,
                "rows": [{"tag": r.tag, "type": r.pool, "allocs": r.allocs, "frees": r.frees, "diff": r.diff,
                          "outstanding_bytes": r.outstanding_bytes, "outstanding_count": r.outstanding_count,
                          "bytes_per_alloc": r.per_alloc, "in_use_start_bytes": r.in_use_start_bytes,
                          "in_use_end_bytes": r.in_use_end_bytes, "owners": r.owners, "description": describe(r.tag)}
                         for r in rows],
                "hidden": {"rows": len(hidden), "bytes": hidden_bytes, "reason": f"--top {top}" if hidden else ""}}
        write_output(output, json.dumps(data, indent=2) + "\n")
        return
    table = Table(show_edge=False, pad_edge=False)
    # bytes in use when the trace started and stopped, from the baseline (sidecar or the kernel's snapshot)
    in_use = any(r.in_use_start_bytes is not None or r.in_use_end_bytes is not None for r in rows)
    extra = (("At Start", "right"), ("At End", "right")) if in_use else ()
    for c, j in (("Tag", "left"), ("Type", "left"), ("Allocs", "right"), ("Frees", "right"), ("Diff", "right"),
                 ("Bytes", "right"), ("Per Alloc", "right"), *extra):
        table.add_column(c, justify=j, overflow="fold")
    # owners wrap after ", "; a name wider than the column ends in "…", never folds onto the next line
    table.add_column("Owner", justify="left", overflow="ellipsis")
    for r in rows:
        owner = ", ".join(r.owners[:3]) + (" …" if len(r.owners) > 3 else "")
        d = describe(r.tag)
        cells = [f"{v:,}" if v is not None else "-"
                 for v in (r.in_use_start_bytes, r.in_use_end_bytes)] if in_use else []
        table.add_row(r.tag, r.pool, f"{r.allocs:,}", f"{r.frees:,}", f"{r.diff:,}", f"{r.outstanding_bytes:,}",
                      f"{r.per_alloc:,}", *cells, owner + (f" — {d}" if d else ""))

    def draw(con) -> None:
        for line in ([f"verdict: {verdict}"] if verdict else []) + [f"warning: {w}" for w in warnings]:
            say(con, line)
        con.print(table)
        more = hidden_line(len(hidden), hidden_bytes, "tags", f"--top {top}")
        if more:
            say(con, more)

    render_text(draw, output)
