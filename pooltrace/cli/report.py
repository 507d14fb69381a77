"""``pooltrace report INPUT``: outstanding allocations grouped by stack, call site, module or tag."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
from rich.console import Console

from pooltrace import api, pooltypes
from pooltrace.analysis import BY, NULL_NS, SORTS, Filters, open_input
from pooltrace.cli.common import progress_bar, quiet_option, user_errors
from pooltrace.errors import PooltraceError
from pooltrace.reporters import structured, text

FORMATS = ("text", "json", "csv", "folded", "pprof", "html")
LIST_LIMIT = 1000


def make_symbolizer(ds, symbols: str | None, no_symbols: bool, input_path: Path, quiet: bool):
    """The Symbolizer for a dataset (pooltrace.api's), with warnings on stderr."""
    return api.make_symbolizer(ds, input_path, symbols, no_symbols, quiet, warn)


def warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def common_options(func):
    for opt in reversed([
        click.option("--window", help="START:END in seconds (1.5, 2s) or ns (1500ns); either side optional."),
        click.option("--tag", "tags", multiple=True, help="Pool tag, as poolmon prints it; ? and * wildcards. "
                                                          "Repeatable."),
        click.option("--pool", type=click.Choice(pooltypes.FILTERS),
                     help="paged, nonpaged (NX or not), nx (non-paged NX) or session pool."),
        click.option("--pid", "pids", type=int, multiple=True, help="Allocating process id. Repeatable."),
        click.option("--module", "modules", multiple=True, help="Module of the allocating call site. Repeatable."),
        click.option("--min-bytes", type=click.IntRange(min=0), default=0, help="Hide groups smaller than this."),
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
    from pooltrace.store import expand_inputs

    found = expand_inputs(paths, run_ids, labels)
    if len(found) != wanted:
        if not any(it["store"] for it in found):
            raise PooltraceError(f"{len(found)} input(s) given where {wanted} are needed")
        raise PooltraceError(f"the inputs select {len(found)} run(s) where {wanted} are needed "
                             "(pick runs of a STORE with --run ID or --label KEY=VALUE)")
    return [it["path"] for it in found]


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--by", type=click.Choice(BY), default="stack", show_default=True,
              help="Group by allocating stack, call site (first frame outside ntoskrnl), its module, or tag.")
@common_options
@store_options
@click.option("--top", type=click.IntRange(min=1), help="Show the N largest groups [text: 20].")
@click.option("--sort", type=click.Choice(SORTS), default="bytes", show_default=True,
              help="bytes: outstanding bytes, largest first; growth: leak, growing, plateau, transient, each "
                   "fastest-growing first.")
@click.option("--list", "list_blocks", is_flag=True, help="Also list the outstanding blocks themselves.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), help="Write to FILE.")
@quiet_option
@user_errors
def report(input_path: Path, by: str, window, tags, pool, pids, modules, min_bytes, symbols, no_symbols, run_ids,
           labels, top, sort, list_blocks, fmt, output, quiet) -> None:
    """Outstanding pool allocations (allocated inside the window, not freed by its end — WPA's AIFO),
    grouped and symbolized. INPUT is an .etl (paired on the fly into INPUT.pooltrace/) or a dataset."""
    if fmt in ("pprof",) and output is None:
        raise PooltraceError("--format pprof is binary: give -o FILE")
    (input_path,) = store_input([input_path], run_ids, labels, 1)
    with progress_bar(input_path, quiet, "pairing") as progress:
        ds = open_input(input_path, progress=progress)
    filters = Filters(list(tags), pool, list(pids), list(modules), min_bytes)
    if top is None and fmt == "text":
        top = 20
    rep, render = api.analyze(ds, input_path, by=by, window=window, filters=filters, symbols=symbols,
                              no_symbols=no_symbols, top=top, quiet=quiet, warn=warn, sort=sort)
    win = rep.window
    blocks = _blocks(ds, rep, render, win) if list_blocks else None
    if fmt == "text":
        if output:
            with open(output, "w", encoding="utf-8") as fh:
                text.render(rep, Console(file=fh, width=100, highlight=False, color_system=None), blocks)
        else:
            text.render(rep, Console(width=100, highlight=False), blocks)
        return
    if fmt == "pprof":
        from pooltrace.reporters import pprof

        output.write_bytes(pprof.to_pprof(rep))
        return
    if fmt == "html":
        from pooltrace.reporters import html

        out = html.to_html(rep, ds, render)
    elif fmt == "json":
        out = structured.to_json(rep)
        if blocks is not None:
            data = json.loads(out)
            data["blocks"] = blocks
            out = json.dumps(data, indent=2) + "\n"
    elif fmt == "csv":
        out = structured.to_csv(rep)
    else:
        out = structured.to_folded(rep)
    if output:
        output.write_text(out, encoding="utf-8")
    else:
        click.echo(out, nl=False)


def _blocks(ds, rep, render, win) -> list[dict]:
    r = ds.rows
    sel = rep.rows[np.argsort(-r["size"][rep.rows].astype(np.int64), kind="stable")][:LIST_LIMIT]
    end = min(win.end_ns, (ds.trace.get("duration_ns") or win.end_ns))
    out = []
    for i in sel.tolist():
        sid = int(r["alloc_stack"][i])
        pid = int(r["pid"][i])
        frames = render.stack(sid, pid if pid != 0xFFFFFFFF else 0, int(r["alloc_ns"][i]))[0] if sid >= 0 else []
        out.append({"address": int(r["address"][i]), "tag": ds.tags[int(r["tag"][i])], "size": int(r["size"][i]),
                    "pool": pooltypes.name(r["pool_type"][i], bool(r["session"][i])),
                    "alloc_ns": int(r["alloc_ns"][i]) if r["alloc_ns"][i] != NULL_NS else None,
                    "age_ns": int(end - r["alloc_ns"][i]), "pid": pid, "tid": int(r["tid"][i]), "frames": frames})
    return out
