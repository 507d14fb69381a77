"""``pooltrace report INPUT``: outstanding allocations grouped by stack, call site, module or tag."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import numpy as np

from pooltrace import api, jsontext, pooltypes
from pooltrace.analysis import BY, SORTS, Filters, parse_window
from pooltrace.cli.common import (
    check_output,
    force_option,
    progress_bar,
    quiet_option,
    render_text,
    size_option_value,
    tag_values,
    user_errors,
    write_output,
)
from pooltrace.datasetopen import NULL_NS, open_input
from pooltrace.errors import PooltraceError
from pooltrace.notices import Hidden, missing_symbols, pool_verdict, trace_warnings, unmatched_filters
from pooltrace.reporters import structured

FORMATS = ("text", "json", "csv", "folded", "pprof", "html")
LIST_FORMATS = ("text", "json")
LIST_LIMIT = 1000


def check_symbol_options(symbols: str | None, no_symbols: bool) -> None:
    """--symbols and --no-symbols exclude each other; a plain directory in --symbols must exist."""
    if symbols is not None and no_symbols:
        raise click.UsageError("--symbols and --no-symbols exclude each other; give one")
    if not symbols:
        return
    from pooltrace.symbols.symbolpath import SymbolPathError, default_cache_dir, parse_symbol_path

    try:
        entries = parse_symbol_path(symbols, default_cache_dir() / "sym")
    except SymbolPathError as exc:
        raise PooltraceError(f"--symbols: {exc}") from None
    for e in entries:
        if e.kind == "dir" and not os.path.isdir(e.path):
            raise PooltraceError(f"--symbols: {e.path}: no such directory")


def make_symbolizer(ds, symbols: str | None, no_symbols: bool, input_path: Path, quiet: bool):
    """The Symbolizer for a dataset (pooltrace.api's), with warnings on stderr."""
    return api.make_symbolizer(ds, input_path, symbols, no_symbols, quiet, warn)


def warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def check_window(window, ds):
    """The --window, refused when it lies wholly after the trace's end."""
    duration = ds.trace.get("duration_ns")
    start = parse_window(window, None).start_ns
    if window and duration is not None and start > duration:
        raise PooltraceError(f"--window {window}: starts at {start / 1e9:.3f} s, after the trace's end "
                             f"({duration / 1e9:.3f} s)")
    win = parse_window(window, duration)
    if window and duration is not None and window.split(":", 1)[-1].strip() and win.end_ns > duration + 1:
        click.echo(f"note: --window {window}: ends after the trace's end ({duration / 1e9:.3f} s); the window "
                   "stops there", err=True)
    return win


def check_filters(datasets, filters: Filters) -> None:
    """A filter that matches nothing is an error naming the closest tags or modules, never an empty pass."""
    problems = unmatched_filters(datasets, filters)
    if problems:
        raise PooltraceError("; ".join(problems))


def notices_of(ds, render) -> dict:
    """What a report of `ds` must say besides its numbers (see pooltrace.notices)."""
    status = render.sym.status() if render.sym is not None else []
    return {"verdict": pool_verdict(ds.trace), "warnings": trace_warnings(ds.trace), "symbols": missing_symbols(status)}


def say_notices(trace: dict, label: str = "") -> None:
    """The verdict and damage warnings on stderr (for formats whose file has no place for them)."""
    prefix = f"{label}: " if label else ""
    verdict = pool_verdict(trace)
    if verdict:
        click.echo(f"warning: {prefix}{verdict}", err=True)
    for w in trace_warnings(trace):
        click.echo(f"warning: {prefix}{w}", err=True)


def common_options(func):
    for opt in reversed([
        click.option("--window", help="START:END in seconds (1.5, 2s, 500ms) or ns (1500ns); either side optional."),
        click.option("--tag", "tags", multiple=True, callback=tag_values,
                     help="Pool tag, as poolmon prints it; ? and * wildcards. Repeatable."),
        click.option("--pool", type=click.Choice(pooltypes.FILTERS),
                     help="paged, nonpaged (NX or not), nx (non-paged NX) or session pool."),
        click.option("--pid", "pids", type=int, multiple=True, help="Allocating process id. Repeatable."),
        click.option("--module", "modules", multiple=True, help="Module of the allocating call site. Repeatable."),
        click.option("--min-bytes", default="0", callback=size_option_value, metavar="SIZE",
                     help="Hide groups smaller than this (4096, 10k, 1.5MB); a footer counts what is hidden."),
        click.option("--symbols", help="Symbol path (_NT_SYMBOL_PATH syntax); default $_NT_SYMBOL_PATH, offline."),
        click.option("--no-symbols", is_flag=True, help="Print module+0xrva, never load PDBs."),
    ]):
        func = opt(func)
    return func


def store_options(func):
    """--run and --label: runs of a run STORE given as input (pooltrace.store)."""
    func = click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
                        help="Runs of a STORE with this label (the same key twice: either value). Repeatable.")(func)
    return click.option("--run", "run_ids", multiple=True, metavar="ID", help="Run ID of a STORE. Repeatable.")(func)


def store_input(paths: list[Path], run_ids, labels, wanted: int) -> list[Path]:
    """The inputs with each run STORE replaced by its selected runs' directories; exactly `wanted` of them."""
    return [it["path"] for it in store_items(paths, run_ids, labels, wanted)]


def store_items(paths: list[Path], run_ids, labels, wanted: int) -> list[dict]:
    """store_input's inputs as pooltrace.store.expand_inputs items (path, store, run_id, labels)."""
    from pooltrace.store import expand_inputs

    found = expand_inputs(paths, run_ids, labels)
    if len(found) != wanted:
        if not any(it["store"] for it in found):
            raise PooltraceError(f"{len(found)} input(s) given where {wanted} are needed")
        raise PooltraceError(f"the inputs select {len(found)} run(s) where {wanted} are needed "
                             "(pick runs of a STORE with --run ID or --label KEY=VALUE)")
    return found


@click.command(epilog="Example: pooltrace report traces/sample-leak.etl --by function --top 5")
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--by", type=click.Choice(BY), default="stack", show_default=True,
              help="Group by allocating stack, call site (first frame outside ntoskrnl), its module, or tag.")
@common_options
@store_options
@click.option("--top", type=click.IntRange(min=1), help="Show the N largest groups [text: 20].")
@click.option("--sort", type=click.Choice(SORTS), default="bytes", show_default=True,
              help="bytes: outstanding bytes, largest first; growth: leak, growing, plateau, transient, each "
                   "fastest-growing first.")
@click.option("--list", "list_blocks", is_flag=True,
              help=f"Also list the outstanding blocks, group by group (text and json; at most {LIST_LIMIT:,}).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True,
              help="Output format (pprof needs -o).")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Write to FILE (atomically; never one of the inputs; an existing FILE needs --force).")
@force_option
@quiet_option
@user_errors
def report(input_path: Path, by: str, window, tags, pool, pids, modules, min_bytes, symbols, no_symbols, run_ids,
           labels, top, sort, list_blocks, fmt, as_json, output, force, quiet) -> None:
    """Outstanding pool allocations (allocated inside the window, not freed by its end — WPA's AIFO),
    grouped and symbolized. INPUT is an .etl (paired on the fly into INPUT.pooltrace/) or a dataset."""
    fmt = "json" if as_json else fmt
    if list_blocks and fmt not in LIST_FORMATS:
        raise click.UsageError(f"--list works with --format text or json, not {fmt}")
    if fmt == "pprof" and output is None:
        raise PooltraceError("--format pprof is binary: give -o FILE")
    check_symbol_options(symbols, no_symbols)
    check_output(output, [input_path], force)
    (item,) = store_items([input_path], run_ids, labels, 1)
    input_path = item["path"]
    with progress_bar(input_path, quiet, "pairing") as progress:
        ds = open_input(input_path, progress=progress)
    if item["store"] is not None:  # the header names the store's run, not the .etl it was once paired from
        ds.trace["run"] = {"store": str(item["store"]), "run_id": item["run_id"], "labels": dict(item["labels"])}
    check_window(window, ds)
    filters = Filters(list(tags), pool, list(pids), list(modules), min_bytes)
    check_filters([ds], filters)
    if top is None and fmt == "text":
        top = 20
    rep, render = api.analyze(ds, input_path, by=by, window=window, filters=filters, symbols=symbols,
                              no_symbols=no_symbols, top=top, quiet=quiet, warn=warn, sort=sort, rows=list_blocks)
    win = rep.window
    blocks, hidden_blocks = _blocks(ds, rep, render, win) if list_blocks else (None, None)
    rep.notices = notices_of(ds, render)
    if fmt in ("csv", "folded", "pprof"):  # these files have no header: say it on stderr
        say_notices(ds.trace)
        hidden = Hidden(rep.hidden_groups, rep.hidden_bytes, "groups", rep.hidden_reason).sentence()
        if hidden:
            click.echo(f"note: {hidden}", err=True)
        if rep.notices["symbols"]:
            click.echo(f"note: {rep.notices['symbols']}", err=True)
    if fmt == "text":
        from pooltrace.reporters import text  # rich: loaded by the formats that draw with it

        render_text(lambda con: text.render(rep, con, blocks, hidden_blocks), output)
        return
    if fmt == "pprof":
        from pooltrace.reporters import pprof

        write_output(output, pprof.to_pprof(rep))
        return
    if fmt == "html":
        from pooltrace.reporters import html

        out = html.to_html(rep, ds, render)
    elif fmt == "json":
        out = structured.to_json(rep)
        if blocks is not None:
            data = json.loads(out)
            data["blocks"] = blocks
            data["blocks_hidden"] = hidden_blocks.as_dict()
            out = jsontext.dumps(data, indent=2) + "\n"
    elif fmt == "csv":
        out = structured.to_csv(rep)
    else:
        out = structured.to_folded(rep)
    write_output(output, out)


def _blocks(ds, rep, render, win) -> tuple[list[dict], Hidden]:
    """The outstanding blocks of the shown groups, in the report's group order, largest first within a
    group; at most LIST_LIMIT, with what is left out counted."""
    from pooltrace.reporters.text import _site

    r = ds.rows
    rows = rep.rows
    rank = np.full(len(rows), len(rep.groups), dtype=np.int64)
    if rep.by == "tag":
        index = {name: i for i, name in enumerate(ds.tags)}
        by_tag = np.full(len(ds.tags) + 1, len(rep.groups), dtype=np.int64)
        for k, g in enumerate(rep.groups):
            by_tag[index[g.key[0]]] = k
        rank = by_tag[r["tag"][rows]]
    else:
        sid_rank = {}
        for k, g in enumerate(rep.groups):
            for sid in g.stack_ids:
                sid_rank.setdefault(sid, k)
        stacks = r["alloc_stack"][rows]
        rank = np.array([sid_rank.get(s, len(rep.groups)) for s in stacks.tolist()], dtype=np.int64)
    shown_rows = rows[rank < len(rep.groups)]
    shown_rank = rank[rank < len(rep.groups)]
    size = r["size"][shown_rows].astype(np.int64)
    order = np.lexsort((-size, shown_rank))
    sel = shown_rows[order]
    all_bytes = int(r["size"][rows].astype(np.int64).sum())
    kept = sel[:LIST_LIMIT]
    why = ([f"--list shows at most {LIST_LIMIT:,}"] if len(sel) > len(kept) else []) + \
        (["blocks of groups not shown"] if len(rows) > len(sel) else [])
    hidden = Hidden(len(rows) - len(kept), all_bytes - int(r["size"][kept].astype(np.int64).sum()), "blocks",
                    "; ".join(why))
    end = min(win.end_ns, (ds.trace.get("duration_ns") or win.end_ns))
    out = []
    for i in kept.tolist():
        sid = int(r["alloc_stack"][i])
        pid = int(r["pid"][i])
        frames = render.stack(sid, pid if pid != 0xFFFFFFFF else 0, int(r["alloc_ns"][i]))[0] if sid >= 0 else []
        out.append({"address": f"0x{int(r['address'][i]):x}", "tag": ds.tags[int(r["tag"][i])],
                    "size": int(r["size"][i]), "call_site": _site(frames) if frames else None,
                    "pool": pooltypes.name(r["pool_type"][i], bool(r["session"][i])),
                    "alloc_ns": int(r["alloc_ns"][i]) if r["alloc_ns"][i] != NULL_NS else None,
                    "age_ns": int(end - r["alloc_ns"][i]), "pid": pid, "tid": int(r["tid"][i]), "frames": frames})
    return out, hidden
