"""``pooltrace info TRACE.etl``: what a trace holds and whether it can show pool leaks."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from pooltrace.cli.common import progress_bar, quiet_option, user_errors
from pooltrace.cli.common import render_text as emit
from pooltrace.traceinfo import summarize


@click.command(epilog="Example: pooltrace info traces/sample-leak.etl")
@click.argument("trace", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text: a summary with a verdict; json: the same as one object.")
@quiet_option
@user_errors
def info(trace: Path, fmt: str, quiet: bool) -> None:
    """OS build, CPUs, clock, duration, events by kind, losses, pool tracing/stack status, and a verdict."""
    with progress_bar(trace, quiet, "reading") as progress:
        summary = summarize(trace.absolute(), progress)  # paths in outputs are absolute
    if fmt == "json":
        click.echo(json.dumps(summary.data, indent=2))
        return
    emit(lambda con: render_text(summary.data, con))


def _yes_no(value) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


def render_text(d: dict, console: Console) -> None:
    secs = d["duration_ns"] / 1e9 if d["duration_ns"] is not None else None
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    rows = [
        ("trace", f"{d['file']} ({d['file_size']:,} bytes)"),
        ("OS", f"Windows {d['os']['version']} build {d['os']['build']}, {d['pointer_size'] * 8}-bit, "
               f"{d['cpus']} CPUs"),
        ("logger", f"{d['logger']} (mode {d['log_file_mode']}{', compressed' if d['compressed'] else ''})"),
        ("clock", f"{d['clock']['type']}, {d['clock']['ticks_per_second'] or '?'} ticks/s"),
        ("start", f"{d['start_time'] or '?'}  (boot {d['boot_time'] or '?'})"),
        ("duration", f"{secs:.3f} s" if secs is not None else "no timed events"),
        ("records", f"{d['records']:,} in {d['buffers']:,} buffers"),
    ]
    for k, v in rows:
        head.add_row(k, v)
    console.print(head)
    ev = Table(title="events by kind", title_justify="left", show_edge=False)
    ev.add_column("kind")
    ev.add_column("count", justify="right")
    for k, v in d["events"].items():
        if v:
            ev.add_row(k.replace("_", " "), f"{v:,}")
    if ev.row_count:
        console.print(ev)
    lost = d["lost"]
    console.print(f"[bold]lost[/]  events {lost['events_lost']:,}, buffers {lost['buffers_lost']:,} (logger); "
                  f"buffers flagged events-lost {lost['buffers_flagged_events_lost']:,}, buffer-lost "
                  f"{lost['buffers_flagged_buffer_lost']:,}; unreadable buffers {lost['buffers_skipped']:,}, "
                  f"bytes skipped {lost['bytes_skipped']:,}")
    if lost["malformed_records"]:
        console.print("[bold]malformed records[/]  " + ", ".join(f"{k} {v:,}" for k, v in
                                                                 lost["malformed_records"].items()))
    p = d["pool"]
    stack_txt = _yes_no(p["stacks_enabled"])
    if p["stack_ratio"] is not None:
        stack_txt += f" ({p['stack_ratio']:.1%} of {p['events_checked_for_stack']:,} allocations checked)"
    console.print(f"[bold]pool[/]  tracing enabled: {_yes_no(p['tracing_enabled'])}; pool events: {p['events']:,}; "
                  f"stacks: {stack_txt}; tags: {p['distinct_tags']:,}")
    if p["tag_filter"]:
        console.print(f"[bold]tag filter[/]  pool events carry only {', '.join(p['tag_filter'])} "
                      "(consistent with a kernel pool-tag filter)")
    b = d.get("baseline") or {}
    if b.get("source"):
        where = {"pool_snapshot": "the kernel's pool snapshot in the trace", "sidecar": "the recorder's sidecar"}
        console.print(f"[bold]baseline[/]  bytes in use per tag at start and stop for {len(b['tags']):,} tags, "
                      f"from {where[b['source']]}")
    for w in d["warnings"]:
        console.print(f"[yellow]warning:[/] {w}", markup=True)
    console.print(f"[bold]verdict[/]  {d['verdict']}")
