"""The text report: header with the window and lifetime counts, a table of the top groups, and for
`--by stack` an indented caller tree of the leading stacks — readable in 100 columns. The header carries the
trace's verdict, damage and loss warnings and the missing-symbols line; a footer counts hidden rows."""

from __future__ import annotations

import textwrap

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pooltrace.analysis import LIFETIMES, Report
from pooltrace.growth import human_rate
from pooltrace.modulemap import KERNEL_IMAGES

TREE_STACKS = 5
MAX_INDENT = 12


def _secs(ns: int) -> str:
    return f"{ns / 1e9:.3f} s"


def say(console: Console, line: str) -> None:
    """A sentence wrapped to the console's width, continuation lines indented."""
    for part in textwrap.wrap(line, width=max(40, console.width), subsequent_indent="    ", break_on_hyphens=False,
                              break_long_words=False):
        console.print(Text(part), overflow="ignore", crop=False)


def notice_lines(report: Report) -> list[str]:
    """The verdict, damage/loss warnings and the missing-symbols line, as the header shows them."""
    n = report.notices or {}
    out = [f"verdict: {n['verdict']}"] if n.get("verdict") else []
    out += [f"warning: {w}" for w in n.get("warnings") or []]
    if n.get("symbols"):
        out.append(f"note: {n['symbols']}")
    return out


def hidden_line(count: int, nbytes: int, what: str, why: str) -> str | None:
    if not count:
        return None
    return f"{count:,} more {what}, {nbytes:,} bytes not shown" + (f" ({why})" if why else "")


def trace_name(t: dict) -> str:
    """The .etl a report came from, or `STORE run ID (key=value, ...)` for a run of a run store."""
    run = t.get("run")
    if not run:
        return str(t.get("source", {}).get("path", "?"))
    labels = ", ".join(f"{k}={v}" for k, v in sorted(run["labels"].items()))
    return f"{run['store']} run {run['run_id']}" + (f" ({labels})" if labels else "")


def before_line(t: dict, shown: set[str]) -> str | None:
    """One sentence for what the kernel counted outstanding before the trace began, for the tags shown (none
    when nothing was): one tag's figures, or the total and each tag's figures."""
    baseline = t.get("tag_baseline") or {}
    rows = [(tag, b["start"]) for tag, b in sorted(baseline.items())
            if tag in shown and b.get("start") and b["start"].get("allocs")]
    if not rows:
        return None
    source = {"pool_snapshot": "the pool snapshot in the trace", "sidecar": "the recorder's sidecar"}.get(
        t.get("tag_baseline_source"), "the recorder's sidecar")
    if len(rows) == 1:
        tag, b = rows[0]
        return (f"before the trace began, the kernel counted {b['allocs']:,} outstanding {tag!r} allocations "
                f"({b['bytes']:,} bytes; from {source}); the trace cannot pair those")
    each = ", ".join(f"{tag!r} {b['allocs']:,} ({b['bytes']:,} B)" for tag, b in rows)
    return (f"before the trace began, the kernel counted {sum(b['allocs'] for _, b in rows):,} outstanding "
            f"allocations of {len(rows)} tags ({sum(b['bytes'] for _, b in rows):,} bytes; from {source}); the "
            f"trace cannot pair those: {each}")


def render(report: Report, console: Console, blocks: list[dict] | None = None, hidden_blocks=None) -> None:
    t = report.trace
    w = report.window
    end = w.end_ns - 1 if t.get("duration_ns") is None or w.end_ns <= t["duration_ns"] + 1 else t["duration_ns"]
    console.print(Text(f"{trace_name(t)} — Windows build {t.get('os', {}).get('build', '?')}, "
                       f"{t.get('cpus', '?')} CPUs, {_secs(t.get('duration_ns') or 0)}"))
    console.print(Text(f"window {_secs(w.start_ns)} .. {_secs(max(end, w.start_ns))}; outstanding (AIFO): "
                       f"{report.outstanding_count:,} blocks, {report.outstanding_bytes:,} bytes"))
    lt = report.lifetimes
    console.print(Text("lifetimes  " + "  ".join(f"{k} {lt[k]['count']:,} ({lt[k]['bytes']:,} B)" for k in LIFETIMES)))
    if not report.notices:  # a caller that did not fill the notices still shows the losses
        lost = t.get("lost", {})
        if lost.get("events") or lost.get("buffers"):
            console.print(Text(f"warning: {lost.get('events', 0):,} events and {lost.get('buffers', 0):,} buffers "
                               "were lost while recording; counts may be incomplete", style="yellow"))
    for line in notice_lines(report):
        say(console, line)
    line = before_line(t, {tag for g in report.groups for tag in g.tags})
    if line:
        say(console, line)
    if not report.groups:
        console.print(Text("no outstanding allocations match" if t.get("pairing", {}).get("allocs") else
                           "no pool allocations in this trace"))
        return
    likely_leaks(report, console)
    table = Table(show_edge=False, pad_edge=False, expand=False)
    table.add_column("#", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("blocks", justify="right")
    table.add_column("trend")
    table.add_column("tags")
    table.add_column({"stack": "allocating frame (call site)"}.get(report.by, report.by), overflow="fold")
    for i, g in enumerate(report.groups, 1):
        tags = ", ".join(g.tags)
        label = _site(g.key) if report.by == "stack" else g.key[0]
        table.add_row(str(i), f"{g.bytes:,}", f"{g.count:,}", trend(g), tags, Text(label))
    console.print(table)
    more = hidden_line(report.hidden_groups, report.hidden_bytes, "groups", report.hidden_reason)
    if more:
        say(console, more)
    if report.by == "stack" and report.groups:
        console.print(Text(f"caller tree of the {min(TREE_STACKS, len(report.groups))} largest stacks "
                           "(outermost caller first; bytes outstanding below each frame)", style="bold"))
        for line in caller_tree(report.groups[:TREE_STACKS]):
            console.print(Text(line), overflow="fold")
    if blocks is not None:
        bt = Table(title="outstanding blocks", title_justify="left", show_edge=False)
        for c in ("address", "tag", "pool", "size", "age", "pid", "call site"):
            bt.add_column(c, justify="right" if c in ("size", "age", "pid") else "left", overflow="fold")
        for b in blocks:
            bt.add_row(b["address"], b["tag"], b["pool"], f"{b['size']:,}", f"{b['age_ns'] / 1e9:.3f} s",
                       str(b["pid"]), Text(b.get("call_site") or "<no stack>"))
        console.print(bt)
        if hidden_blocks is not None:
            more = hidden_line(hidden_blocks.count, hidden_blocks.bytes, "blocks", hidden_blocks.why)
            if more:
                say(console, more)


def trend(g) -> str:
    """The trend column: growth class and, for growing groups, the rate."""
    if g.growth is None:
        return ""
    if g.growth.cls in ("leak", "growing"):
        return f"{g.growth.cls} {human_rate(g.growth.bytes_per_s)}"
    return g.growth.cls


def likely_leaks(report: Report, console: Console) -> None:
    """The section on top: groups whose outstanding bytes grow (class leak, then growing), fastest first,
    whatever their size; or a line saying that none does."""
    if not report.likely:
        console.print(Text("likely leaks: none (no group keeps growing through the window; see the trend column)"))
        return
    console.print(Text("likely leaks (outstanding bytes growing through the window; fastest first)", style="bold"))
    for g in report.likely:
        label = _site(g.key) if report.by == "stack" else g.key[0]
        console.print(Text(f"  {g.growth.cls:<8} {human_rate(g.growth.bytes_per_s):>13}  {g.bytes:>12,} B "
                           f"{g.count:>8,} blocks  {label}"), overflow="fold")
    console.print()


def caller_tree(groups) -> list[str]:
    """Merge stacks into a prefix tree from the outermost caller; one line per frame, indented by depth
    (capped so that deep stacks stay within 100 columns), a chain of single children shares a level."""
    root: dict = {}
    for g in groups:
        node = root
        for frame in reversed(g.key):
            child = node.setdefault(frame, {"bytes": 0, "count": 0, "kids": {}})
            child["bytes"] += g.bytes
            child["count"] += g.count
            node = child["kids"]
    lines: list[str] = []

    def walk(node: dict, depth: int) -> None:
        for frame, info in sorted(node.items(), key=lambda kv: -kv[1]["bytes"]):
            branch = len(node) > 1
            indent = min(depth, MAX_INDENT)
            lines.append(f"{'  ' * indent}{'+ ' if branch else ''}{frame}  {info['bytes']:,} B / {info['count']:,}")
            walk(info["kids"], depth + (1 if branch or len(info["kids"]) > 1 else 0))

    walk(root, 0)
    return lines


def _site(frames: list[str]) -> str:
    """The row label for a stack: its first frame outside the kernel image, or the allocator's caller."""
    for f in frames:
        if f.split("!", 1)[0].split("+", 1)[0].lower() not in KERNEL_IMAGES:
            return f
    return frames[1] if len(frames) > 1 else (frames[0] if frames else "<no stack>")
