"""One self-contained HTML file (no network): a flame graph of outstanding bytes by stack (click a frame
to zoom, back/reset to zoom out, search with the matched share of bytes, sizes in KiB/MiB/GiB), a sortable
table of the groups with a sparkline of each group's outstanding bytes and its growth class (click a row to
highlight its stack in the flame graph), and outstanding bytes over the window for the top tags (labelled
axes, values on hover). A trace without pool events shows `info`'s verdict instead of empty graphs.

The template (report.html, beside this module) receives the data as JSON inside a
<script type="application/json"> element with every `<` escaped; the page inserts trace strings with
textContent only, so nothing from a trace is ever parsed as markup.
"""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path

import numpy as np

from pooltrace.analysis import Filters, Report, row_mask
from pooltrace.datasetopen import NULL_NS, Dataset
from pooltrace.errors import PooltraceError
from pooltrace.growth import human_rate
from pooltrace.reporters.text import _site, hidden_line, notice_lines, trace_name

POINTS = 120
TOP_TAGS = 5


def _template() -> str:
    return resources.files("pooltrace.reporters").joinpath("report.html").read_text(encoding="utf-8")


def series(ds: Dataset, report: Report) -> dict:
    """Per top tag: bytes allocated inside the window and not yet freed, sampled over the window."""
    w = report.window
    end = min(w.end_ns, (ds.trace.get("duration_ns") or w.end_ns) + 1)
    t = np.linspace(w.start_ns, end, POINTS).astype(np.int64)  # the whole window, from its start
    r = ds.rows
    by_tag: dict[str, int] = {}
    for g in report.groups:
        for tag, b in g.tags.items():
            by_tag[tag] = by_tag.get(tag, 0) + b
    lines = []
    index = {name: i for i, name in enumerate(ds.tags)}
    base = np.flatnonzero(row_mask(ds, Filters()))
    for tag in sorted(by_tag, key=lambda k: -by_tag[k])[:TOP_TAGS]:
        rows = base[r["tag"][base] == index[tag]]
        a, f, s = r["alloc_ns"][rows], r["free_ns"][rows], r["size"][rows].astype(np.int64)
        inside = (a != NULL_NS) & (a >= w.start_ns) & (a < end)
        a, f, s = a[inside], f[inside], s[inside]
        f = np.where(f == NULL_NS, np.iinfo(np.int64).max, f)
        oa = np.argsort(a)
        cum_a = np.concatenate([[0], np.cumsum(s[oa])])
        of = np.argsort(f)
        cum_f = np.concatenate([[0], np.cumsum(s[of])])
        live = cum_a[np.searchsorted(a[oa], t, side="right")] - cum_f[np.searchsorted(f[of], t, side="right")]
        lines.append({"tag": tag, "bytes": live.tolist()})
    return {"t": t.tolist(), "lines": lines, "start": int(w.start_ns), "end": int(end)}


def empty_verdict(trace: dict) -> str:
    """What to show instead of empty graphs: `info`'s verdict for a trace without pool allocations (read
    from the trace when it is at hand, else the pairing notes), or that nothing matches."""
    if (trace.get("pairing") or {}).get("allocs"):
        return "no outstanding allocations match the window and filters"
    src = (trace.get("source") or {}).get("path")
    if src and Path(src).is_file():
        from pooltrace.traceinfo import summarize

        try:
            return "verdict: " + summarize(src).verdict
        except (PooltraceError, OSError, ValueError):
            pass
    notes = trace.get("notes") or []
    return "verdict: " + (notes[0] if notes else "no pool allocations in this trace")


def _trend(g) -> dict:
    gr = g.growth
    if gr is None:
        return {"cls": "", "rate": "", "spark": None, "bps": 0}
    return {"cls": gr.cls, "rate": human_rate(gr.bytes_per_s) if gr.cls in ("leak", "growing") else "",
            "spark": gr.series_bytes, "bps": round(gr.bytes_per_s, 3)}


def to_html(report: Report, ds: Dataset, render=None) -> str:
    t = report.trace
    meta = (f"{trace_name(t)} — Windows build {t.get('os', {}).get('build', '?')}, "
            f"{t.get('cpus', '?')} CPUs; window {report.window.start_ns / 1e9:.3f}–"
            f"{min(report.window.end_ns, (t.get('duration_ns') or 0) + 1) / 1e9:.3f} s; outstanding "
            f"{report.outstanding_count:,} blocks, {report.outstanding_bytes:,} bytes; lifetimes " +
            ", ".join(f"{k} {v['count']:,}" for k, v in report.lifetimes.items()))
    groups = [{"frames": g.key, "bytes": g.bytes, "count": g.count} for g in report.groups]
    rows = [{"gi": i, "bytes": g.bytes, "count": g.count, "tags": ", ".join(g.tags),
             "site": _site(g.key) if report.by == "stack" else g.key[0], **_trend(g)}
            for i, g in enumerate(report.groups)]
    keyname = {"stack": "allocating frame (call site)"}.get(report.by, report.by)
    columns = [{"key": "bytes", "label": "bytes", "bytes": True}, {"key": "count", "label": "blocks", "num": True},
               {"key": "bps", "label": "trend (bytes over the window)", "trend": True},
               {"key": "tags", "label": "tags"}, {"key": "site", "label": keyname, "mono": True}]
    notices = notice_lines(report)
    more = hidden_line(report.hidden_groups, report.hidden_bytes, "groups", report.hidden_reason)
    if more:
        notices.append(f"note: {more}")
    return page(t, {"title": "Outstanding pool allocations", "meta": meta, "notices": notices, "groups": groups,
                    "rows": rows,
                    "columns": columns, "series": series(ds, report) if report.groups else None,
                    "verdict": None if report.groups else empty_verdict(t),
                    "flametitle": "Flame graph (width = outstanding bytes; outermost caller at the top; click a frame "
                                  "to zoom)",
                    "plottitle": "Outstanding bytes over the window, top tags (allocated in the window and not yet "
                                 "freed)"})


def page(trace: dict, data: dict) -> str:
    """The template filled with `data` (escaped so that no trace string can close the script element)."""
    text = json.dumps(data, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    name = str(trace.get("source", {}).get("path", "report")).replace("\\", "/").rsplit("/", 1)[-1]
    return _template().replace("__TITLE__", html.escape(name)).replace("__DATA__", text)
