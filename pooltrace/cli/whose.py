"""``pooltrace whose TAG [PATH...]``: who owns a pool tag — the CLI over ``pooltrace.owners``.

Three independent answers, each shown with its evidence: the trace's call sites allocating TAG, the user's
pooltag.txt, and the driver files holding the tag's bytes (see ``pooltrace.owners``). TAG is a pool tag as
poolmon prints it (``Leak``, ``Irp`` for ``Irp ``, ``\\x01abc``); ``?`` matches any one character and ``*`` the
rest (``Lea?``, ``Ntf*``).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from pooltrace.cli.common import progress_bar, quiet_option, user_errors
from pooltrace.cli.report import check_symbol_options
from pooltrace.modulemap import KERNEL_IMAGES
from pooltrace.owners import find_owners, split_paths


@click.command(epilog="Example: pooltrace whose Leak traces/sample-leak.etl tests/fixtures/symbols "
                      "--pooltag tests/fixtures/symbols/pooltag.txt")
@click.argument("tag")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--pooltag", "pooltag_path", type=click.Path(path_type=Path, dir_okay=False),
              help="pooltag.txt to read [default: $POOLTRACE_POOLTAG, else the Windows Kits debuggers' triage "
                   "folder].")
@click.option("--symbols", "symbol_path", metavar="PATH",
              help="Symbol path, _NT_SYMBOL_PATH syntax (srv*cache*url;dir...) [default: $_NT_SYMBOL_PATH; "
                   "offline when unset].")
@click.option("--no-symbols", is_flag=True, help="Show module+offset frames; read no PDB.")
@click.option("--scan/--no-scan", default=True, show_default=True,
              help="Scan driver files for the tag's bytes (the directories among PATH, else on Windows "
                   "%SystemRoot%\\System32\\drivers).")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True, help="Call sites per module.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text: the three answers with their evidence; json: the same as one object.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@quiet_option
@user_errors
def whose(tag: str, paths: tuple[Path, ...], pooltag_path: Path | None, symbol_path: str | None,
          no_symbols: bool, scan: bool, top: int, fmt: str, as_json: bool, quiet: bool) -> None:
    """Who owns pool tag TAG: call sites in a trace (PATH: a .etl or a dataset directory), the user's
    pooltag.txt, and the driver files holding the tag (PATH: directories or files to scan)."""
    check_symbol_options(symbol_path, no_symbols)
    as_json = as_json or fmt == "json"
    answer = find_owners(tag, paths, pooltag=pooltag_path, symbols=symbol_path, no_symbols=no_symbols, scan=scan,
                         top=top, quiet=quiet, pairing_progress=lambda p: progress_bar(p, quiet, "pairing"))
    tr = answer.get("trace")
    if tr is not None:  # paths in outputs are absolute
        for key in ("source", "dataset"):
            if tr.get(key):
                tr[key] = str(Path(tr[key]).absolute())
    if as_json:
        click.echo(json.dumps(answer, indent=2))
    else:
        _render(answer, bool(split_paths(paths)[1]) or not scan)


def _render(a: dict, scanned_explicitly: bool) -> None:
    echo = click.echo
    echo(f"tag {a['tag']!r}")
    pt = a["pooltag"]
    if pt["file"] is None:
        echo("  pooltag.txt: not found (--pooltag FILE or POOLTRACE_POOLTAG; it comes with the Debugging Tools "
             "for Windows, Debuggers\\x64\\triage\\pooltag.txt)")
    elif not pt["entries"]:
        echo(f"  pooltag.txt ({pt['file']}): no entry")
    else:
        echo(f"  pooltag.txt ({pt['file']}):")
        for e in pt["entries"]:
            echo(f"    {e['tag']} - {e['binary'] or '?'} - {e['description']}   (line {e['line']}"
                 f"{', wildcard' if e['wildcard'] else ''})")
    tr = a.get("trace")
    if tr is not None:
        echo(f"  trace {tr['source']}: {tr['allocations']:,} allocations of {', '.join(tr['tags']) or a['tag']}, "
             f"{tr['outstanding']:,} outstanding ({tr['outstanding_bytes']:,} bytes)"
             + (f", {tr['without_stack']:,} without a stack" if tr["without_stack"] else ""))
        if tr.get("pool_verdict"):
            echo(f"    verdict: {tr['pool_verdict']}")
        for w in tr.get("warnings") or []:
            echo(f"    warning: {w}")
        if not tr["tags"] and tr.get("closest_tags"):
            echo(f"    no tag of this trace matches {a['tag']!r}; closest: {', '.join(tr['closest_tags'])} "
                 "(tags are case-sensitive)")
        for o in tr["owners"]:
            echo(f"    {o['module']}: {o['allocations']:,} allocations, {o['outstanding']:,} outstanding "
                 f"({o['outstanding_bytes']:,} bytes)")
            for s in o["sites"]:
                via = f"  <- {s['caller']}" if s["caller"] else ""
                echo(f"      {s['allocations']:>8,} alloc {s['outstanding']:>8,} out  {s['site']}{via}")
        owners = {o["module"].lower() for o in tr["owners"]} | KERNEL_IMAGES
        unresolved = [s for s in tr["symbols"]
                      if s["status"] not in ("found", "disabled") and s["module"].lower() in owners]
        for s in unresolved:
            echo(f"    symbols: {s['module']}: {s['status']} ({s['detail']})")
    sc = a.get("scan")
    if sc is not None:
        echo(f"  files: {len(sc['files'])} of {sc['files_scanned']:,} image(s) scanned in "
             f"{', '.join(sc['targets'])} hold the bytes {a['tag']!r}"
             + (f" ({sc['unreadable']} unreadable)" if sc["unreadable"] else ""))
        for p in sc.get("not_images") or []:
            echo(f"    {p}: not a PE image (its bytes were searched anyway)")
        for f in sorted(sc["files"], key=lambda f: (-f["code_loads"], -f["count"], f["path"])):
            echo(f"    {f['path']}: {f['count']} occurrence(s), {f['code_loads']} loaded by an instruction")
            for o in f["offsets"]:
                where = f"{o['section']} rva 0x{o['rva']:x}" if o["section"] else "outside sections"
                what = f", {o['instruction']}" if o["instruction"] else ""
                echo(f"      offset 0x{o['offset']:x} ({where}{what})")
    elif not scanned_explicitly:
        echo("  files: no driver directory given (add directories to scan after TAG)")
    for w in a["warnings"]:
        echo(f"warning: {w}", err=True)
    echo(a["verdict"])
