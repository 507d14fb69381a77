"""Renderers for `pooltrace trend`: text (a table: status, first run, bytes per run), JSON, CSV, and one
self-contained HTML page with a small bar chart (inline SVG, no script, no network) per top group."""

from __future__ import annotations

import csv
import html
import io
import json

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pooltrace.reporters.text import _site, say
from pooltrace.trends import Trend, TrendGroup

HTML_GROUPS = 12


def label(t: Trend, g: TrendGroup) -> str:
    return _site(g.frames) if t.by == "stack" else g.frames[0]


def to_data(t: Trend) -> dict:
    return {
        "by": t.by, "tolerance": t.tolerance,
        "runs": [{"run": k, "name": r.name, "source": r.source, "labels": r.labels,
                  "outstanding_count": r.report.outstanding_count, "outstanding_bytes": r.report.outstanding_bytes,
                  "events_lost": r.report.trace.get("lost", {}).get("events", 0),
                  "notes": list(r.report.trace.get("notes") or []),
                  "warnings": list(r.report.trace.get("warnings") or [])}
                 for k, r in enumerate(t.runs, 1)],
        "groups": [{"frames": g.frames, "status": g.status, "first_run": g.first_run, "bytes": g.bytes,
                    "count": g.counts} for g in t.groups],
    }


def to_json(t: Trend) -> str:
    return json.dumps(to_data(t), indent=2) + "\n"


def to_csv(t: Trend) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    n = len(t.runs)
    w.writerow(["status", "first_run", *[f"bytes_{k}" for k in range(1, n + 1)],
                *[f"count_{k}" for k in range(1, n + 1)], "frames"])
    for g in t.groups:
        w.writerow([g.status, g.first_run, *g.bytes, *g.counts, " <- ".join(g.frames)])
    return out.getvalue()


def run_notices(t: Trend) -> list[str]:
    """Per run: events lost while recording, the pairing's notes (no pool events...) and warnings."""
    out = []
    for k, r in enumerate(t.runs, 1):
        tr = r.report.trace
        if tr.get("lost", {}).get("events"):
            out.append(f"run {k} ({r.name}): {tr['lost']['events']:,} events lost while recording")
        out += [f"run {k} ({r.name}): {n}" for n in [*(tr.get("notes") or []), *(tr.get("warnings") or [])]]
    return out


def render_text(t: Trend, console: Console, top: int | None) -> None:
    """Runs, their warnings, then one row per group: a table when it fits the console's width, else (many
    runs, a narrow terminal) a block per group: its status and call site, then its bytes per run."""
    for k, r in enumerate(t.runs, 1):
        say(console, f"run {k}: {r.name}  {r.report.outstanding_count:,} blocks "
                     f"{r.report.outstanding_bytes:,} bytes outstanding  ({r.source})")
    for line in run_notices(t):
        say(console, f"warning: {line}")
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("status", no_wrap=True)
    table.add_column("first", justify="right", no_wrap=True)
    for k in range(1, len(t.runs) + 1):
        table.add_column(f"run {k}", justify="right", no_wrap=True)
    table.add_column("call site" if t.by == "stack" else t.by, no_wrap=True)
    for g in t.groups[:top]:
        table.add_row(g.status, str(g.first_run), *[f"{b:,}" for b in g.bytes], Text(label(t, g)))
    if console.measure(table, options=console.options.update_width(1 << 16)).maximum <= console.width:
        console.print(table)
    else:
        for g in t.groups[:top]:
            say(console, f"{g.status} (first in run {g.first_run}): {label(t, g)}")
            say(console, "    bytes in runs 1.." + f"{len(t.runs)}: " + ", ".join(f"{b:,}" for b in g.bytes))
    hidden = len(t.groups) - len(t.groups[:top])
    if hidden > 0:
        console.print(Text(f"{hidden:,} more group(s) not shown (--top)"))


def _chart(g: TrendGroup, width: int = 240, height: int = 60) -> str:
    n = len(g.bytes)
    peak = max(g.bytes) or 1
    bar = width / n
    parts = [f'<svg class="chart" width="{width}" height="{height + 14}" viewBox="0 0 {width} {height + 14}" '
             f'role="img" aria-label="outstanding bytes per run">']
    for k, b in enumerate(g.bytes):
        h = round(b / peak * height, 1)
        parts.append(f'<rect x="{k * bar + 1:.1f}" y="{height - h:.1f}" width="{max(bar - 2, 1):.1f}" height="{h}">'
                     f'<title>run {k + 1}: {b:,} bytes, {g.counts[k]:,} blocks</title></rect>')
        parts.append(f'<text x="{k * bar + bar / 2:.1f}" y="{height + 12}">{k + 1}</text>')
    parts.append("</svg>")
    return "".join(parts)


def to_html(t: Trend, top: int | None = None) -> str:
    e = html.escape
    rows = []
    for g in t.groups[:top or HTML_GROUPS]:
        rows.append(f'<section class="group {e(g.kind)}"><h2>{e(label(t, g))}</h2>'
                    f'<p class="status">{e(g.status)} · first run {g.first_run} · last run {g.bytes[-1]:,} bytes</p>'
                    f'{_chart(g)}<details><summary>frames</summary><pre>{e(chr(10).join(g.frames))}</pre></details>'
                    f'</section>')
    runs = "".join(f"<li>run {k}: {e(r.name)} — {r.report.outstanding_bytes:,} bytes outstanding "
                   f"<small>{e(r.source)}</small></li>" for k, r in enumerate(t.runs, 1))
    lost = "".join(f'<p class="warning">{e(w)}</p>' for w in run_notices(t))
    hidden = max(0, len(t.groups) - len(t.groups[:top or HTML_GROUPS]))
    more = f'<p class="hidden">{hidden:,} more group(s) not shown</p>' if hidden else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>pooltrace trend ({len(t.runs)} runs)</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
section.group {{ display: inline-block; vertical-align: top; width: 280px; margin: 0 1em 1em 0; }}
h2 {{ font-size: 13px; font-family: monospace; word-break: break-all; margin: 0 0 .2em; }}
.status {{ margin: 0 0 .3em; color: #555; }} .growing .status, .new .status {{ color: #b00; }}
.fixed .status, .shrunk .status {{ color: #070; }} .chart rect {{ fill: #c44; }}
.stable .chart rect, .fixed .chart rect {{ fill: #888; }}
.chart text {{ font-size: 10px; text-anchor: middle; fill: #555; }} .warning {{ color: #b00; }}
</style></head><body>
<h1>Outstanding pool bytes across {len(t.runs)} runs (by {e(t.by)})</h1>
<ul class="runs">{runs}</ul>{lost}
<div id="groups">{"".join(rows)}</div>{more}
</body></html>
"""
