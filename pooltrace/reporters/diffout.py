"""Renderers for `pooltrace diff`: text (biggest growth first), JSON, CSV, a differential flame graph
in HTML, and pprof with NEW minus BASE as values (what `pprof -diff_base` shows)."""

from __future__ import annotations

import csv
import io
import json

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pooltrace.analysis import Group, Report
from pooltrace.compare import Diff
from pooltrace.growth import human_rate
from pooltrace.reporters import pprof
from pooltrace.reporters.html import empty_verdict, page
from pooltrace.reporters.text import _site, notice_lines, say


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else round(x, 3)


def _growth(gr) -> dict | None:
    return {"class": gr.cls, "bytes_per_s": round(gr.bytes_per_s, 3)} if gr is not None else None


def biggest(d: Diff, top: int | None) -> list:
    """The `top` groups with the biggest changes (growth or shrinkage), in the diff's order (growth first)."""
    if not top or top >= len(d.groups):
        return list(d.groups)
    keep = {id(g) for g in sorted(d.groups, key=lambda g: -abs(g.delta_bytes))[:top]}
    return [g for g in d.groups if id(g) in keep]


def hidden(d: Diff, shown: list) -> tuple[int, float]:
    keep = {id(g) for g in shown}
    rest = [g for g in d.groups if id(g) not in keep]
    return len(rest), sum(abs(g.delta_bytes) for g in rest)


def _side_notices(rep: Report) -> dict:
    n = rep.notices or {}
    return {"verdict": n.get("verdict"), "warnings": n.get("warnings") or [], "symbols": n.get("symbols")}


def to_json(d: Diff, gate: dict | None = None, top: int | None = None, growth: bool = False) -> str:
    shown = biggest(d, top)
    n_hidden, b_hidden = hidden(d, shown)
    data = {
        "gate": gate,
        "normalize": d.normalize, "base_scale_ratio": d.scale,
        "totals": {
            "base": {"outstanding_count": _num(d.base_count), "outstanding_bytes": _num(d.base_bytes),
                     "source": d.base.trace.get("source", {}).get("path")},
            "new": {"outstanding_count": d.new.outstanding_count, "outstanding_bytes": d.new.outstanding_bytes,
                    "source": d.new.trace.get("source", {}).get("path")},
            "delta_count": _num(d.new.outstanding_count - d.base_count),
            "delta_bytes": _num(d.new.outstanding_bytes - d.base_bytes),
            "tags": {t: {k: _num(v) for k, v in row.items()} for t, row in d.tags().items()},
        },
        "groups": [{"frames": g.frames, "base_count": _num(g.base_count), "base_bytes": _num(g.base_bytes),
                    "new_count": g.new_count, "new_bytes": g.new_bytes, "delta_count": _num(g.delta_count),
                    "delta_bytes": _num(g.delta_bytes), "status": g.status,
                    **({"base_growth": _growth(g.base_growth), "new_growth": _growth(g.new_growth)} if growth else {})}
                   for g in shown],
        "hidden": {"groups": n_hidden, "abs_delta_bytes": _num(b_hidden), "reason": f"--top {top}" if n_hidden else ""},
        "base": _side_notices(d.base), "new": _side_notices(d.new),
        "warnings": [f"BASE: {w}" for w in _side_notices(d.base)["warnings"]] +
                    [f"NEW: {w}" for w in _side_notices(d.new)["warnings"]],
    }
    return json.dumps(data, indent=2) + "\n"


def to_csv(d: Diff, growth: bool = False) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    extra = ["base_class", "base_bytes_per_s", "new_class", "new_bytes_per_s"] if growth else []
    w.writerow(["status", "delta_bytes", "delta_count", "base_bytes", "new_bytes", "base_count", "new_count",
                *extra, "frames"])
    for g in d.groups:
        figures = []
        if growth:
            for gr in (g.base_growth, g.new_growth):
                figures += [gr.cls, round(gr.bytes_per_s, 3)] if gr is not None else ["", ""]
        w.writerow([g.status, _num(g.delta_bytes), _num(g.delta_count), _num(g.base_bytes), g.new_bytes,
                    _num(g.base_count), g.new_count, *figures, " <- ".join(g.frames)])
    return out.getvalue()


def render_text(d: Diff, console: Console, top: int | None, growth: bool = False) -> None:
    b, n = d.base.trace.get("source", {}).get("path"), d.new.trace.get("source", {}).get("path")
    console.print(Text(f"BASE {b}\nNEW  {n}"))
    for label, rep in (("BASE", d.base), ("NEW", d.new)):
        for line in notice_lines(rep):
            say(console, f"{label}: {line}")
    scale = f" (BASE scaled x{d.scale:.3f} by {d.normalize})" if d.normalize else ""
    console.print(Text(f"outstanding: BASE {d.base_count:,.0f} blocks {d.base_bytes:,.0f} bytes; NEW "
                       f"{d.new.outstanding_count:,} blocks {d.new.outstanding_bytes:,} bytes; change "
                       f"{d.new.outstanding_bytes - d.base_bytes:+,.0f} bytes{scale}"))
    table = Table(show_edge=False, pad_edge=False)
    for c, j in (("status", "left"), ("Δ bytes", "right"), ("base", "right"), ("new", "right"),
                 ("Δ blocks", "right"), *((("base trend", "left"), ("new trend", "left")) if growth else ()),
                 ("call site" if d.new.by == "stack" else d.new.by, "left")):
        table.add_column(c, justify=j, overflow="fold")
    shown = biggest(d, top)
    for g in shown:
        label = _site(g.frames) if d.new.by == "stack" else g.frames[0]
        trends = [_trend(g.base_growth), _trend(g.new_growth)] if growth else []
        table.add_row(g.status, f"{g.delta_bytes:+,.0f}", f"{g.base_bytes:,.0f}", f"{g.new_bytes:,}",
                      f"{g.delta_count:+,.0f}", *trends, Text(label))
    console.print(table)
    n_hidden, b_hidden = hidden(d, shown)
    if n_hidden:
        say(console, f"{n_hidden:,} more groups not shown (changes of {b_hidden:,.0f} bytes in all; --top {top})")
    tags = Table(title="by tag", title_justify="left", show_edge=False, pad_edge=False)
    for c in ("tag", "base bytes", "new bytes", "Δ bytes"):
        tags.add_column(c, justify="left" if c == "tag" else "right")
    for t, row in d.tags().items():
        tags.add_row(t, f"{row['base_bytes']:,.0f}", f"{row['new_bytes']:,}", f"{row['delta_bytes']:+,.0f}")
    console.print(tags)


def _trend(gr) -> str:
    if gr is None:
        return "-"
    return f"{gr.cls} {human_rate(gr.bytes_per_s)}" if gr.cls in ("leak", "growing") else gr.cls


def to_html(d: Diff) -> str:
    groups = [{"frames": g.frames, "bytes": g.new_bytes, "count": g.new_count, "delta": g.delta_bytes}
              for g in d.groups if g.new_bytes > 0]
    gi = {id(g): i for i, g in enumerate(g for g in d.groups if g.new_bytes > 0)}
    rows = [{"gi": gi.get(id(g), -1), "status": g.status, "delta": g.delta_bytes, "base": g.base_bytes,
             "new": g.new_bytes, "base_count": g.base_count, "new_count": g.new_count, "delta_count": g.delta_count,
             "site": _site(g.frames) if d.new.by == "stack" else g.frames[0]} for g in d.groups]
    columns = [{"key": "status", "label": "status"},
               {"key": "delta", "label": "Δ bytes", "bytes": True, "signed": True},
               {"key": "base", "label": "BASE bytes", "bytes": True},
               {"key": "new", "label": "NEW bytes", "bytes": True},
               {"key": "base_count", "label": "BASE blocks", "num": True},
               {"key": "new_count", "label": "NEW blocks", "num": True},
               {"key": "delta_count", "label": "Δ blocks", "num": True, "signed": True},
               {"key": "site", "label": "call site" if d.new.by == "stack" else d.new.by, "mono": True}]
    tagrows = [{"tag": t, "base": r["base_bytes"], "new": r["new_bytes"], "delta": r["delta_bytes"]}
               for t, r in d.tags().items()]
    tagcolumns = [{"key": "tag", "label": "tag", "mono": True}, {"key": "base", "label": "BASE bytes", "bytes": True},
                  {"key": "new", "label": "NEW bytes", "bytes": True},
                  {"key": "delta", "label": "Δ bytes", "bytes": True, "signed": True}]
    meta = (f"BASE {d.base.trace.get('source', {}).get('path')} ({d.base_bytes:,.0f} bytes outstanding) — NEW "
            f"{d.new.trace.get('source', {}).get('path')} ({d.new.outstanding_bytes:,} bytes)"
            + (f"; BASE scaled x{d.scale:.3f} by {d.normalize}" if d.normalize else ""))
    verdict = None
    if not d.groups:
        verdict = "; ".join(f"{side}: {empty_verdict(r.trace)}" for side, r in (("BASE", d.base), ("NEW", d.new)))
    notices = [f"{label}: {line}" for label, rep in (("BASE", d.base), ("NEW", d.new)) for line in notice_lines(rep)]
    return page(d.new.trace, {"title": "Pool leak comparison", "meta": meta, "notices": notices,
                              "groups": groups, "rows": rows,
                              "columns": columns, "diff": True, "series": None, "verdict": verdict,
                              "tagrows": tagrows, "tagcolumns": tagcolumns,
                              "flametitle": "Differential flame graph (width = NEW outstanding bytes; click a frame "
                                            "to zoom)", "plottitle": ""})


def to_pprof(d: Diff) -> bytes:
    """Values are NEW minus BASE, so the profile reads like `pprof -diff_base BASE NEW`."""
    groups = [Group(g.frames, round(g.delta_count), round(g.delta_bytes), g.new_tags or g.base_tags, [], 0)
              for g in d.groups if g.delta_bytes or g.delta_count]
    rep = Report(d.new.trace, d.new.window, d.new.lifetimes, 0, 0, d.new.by, groups, d.new.rows,
                 frame_rvas={**d.base.frame_rvas, **d.new.frame_rvas})
    return pprof.to_pprof(rep)
