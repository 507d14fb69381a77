"""Machine-readable report formats: JSON (stable shape, documented in the README), CSV, and folded
stacks (flamegraph.pl / speedscope input)."""

from __future__ import annotations

import csv
import io

from pooltrace import jsontext
from pooltrace.analysis import Report
from pooltrace.growth import THRESHOLDS


def trace_summary(report: Report) -> dict:
    return trace_summary_of(report.trace)


def trace_summary_of(t: dict) -> dict:
    """The trace facts every JSON output starts with (from trace.json); for a run of a run store, the
    store (as `source`), its `run_id` and `labels` (null and {} otherwise)."""
    run = t.get("run") or {}
    return {"source": run.get("store") or t.get("source", {}).get("path"), "run_id": run.get("run_id"),
            "labels": run.get("labels") or {}, "os_build": t.get("os", {}).get("build"),
            "pointer_size": t.get("pointer_size"), "cpus": t.get("cpus"), "start_time": t.get("start_time"),
            "duration_ns": t.get("duration_ns"), "events_lost": t.get("lost", {}).get("events", 0),
            "buffers_lost": t.get("lost", {}).get("buffers", 0)}


def notices(report: Report) -> dict:
    """`verdict` (null when the trace can answer), `warnings` (damage, losses) and `symbols` (null or the
    missing-PDB line): the same in every JSON output."""
    n = report.notices or {}
    warnings = n.get("warnings")
    if warnings is None:
        warnings = list(report.trace.get("warnings") or [])
    return {"verdict": n.get("verdict"), "warnings": warnings, "symbols": n.get("symbols")}


def report_data(report: Report) -> dict:
    """The JSON report as data (the API's DataFrames are built from it too)."""
    return {
        "trace": trace_summary(report),
        "window": {"start_ns": report.window.start_ns, "end_ns": report.window.end_ns},
        "by": report.by,
        "totals": {"outstanding_count": report.outstanding_count, "outstanding_bytes": report.outstanding_bytes,
                   "lifetimes": report.lifetimes},
        "sort": report.sort,
        "growth": {"points": len(report.times_ns), "times_ns": report.times_ns, "thresholds": THRESHOLDS},
        "likely_leaks": [{"frames": g.key, "count": g.count, "bytes": g.bytes,
                          "growth": g.growth.as_dict(series=False)} for g in report.likely],
        "groups": [{"frames": g.key, "count": g.count, "bytes": g.bytes, "tags": g.tags,
                    "growth": g.growth.as_dict() if g.growth else None} for g in report.groups],
        "hidden": {"groups": report.hidden_groups, "bytes": report.hidden_bytes, "reason": report.hidden_reason},
        **notices(report),
    }


def to_json(report: Report) -> str:
    return jsontext.dumps(report_data(report), indent=2) + "\n"


GROWTH_COLUMNS = ["class", "bytes_per_s", "blocks_per_s", "r2", "late_bytes_per_s", "still_growing", "alloc_per_s",
                  "free_per_s", "survivor_position", "age_spread"]


def to_csv(report: Report) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["rank", "bytes", "count", "tags", *GROWTH_COLUMNS, report.by if report.by != "stack" else "frames"])
    for i, g in enumerate(report.groups, 1):
        tags = ";".join(f"{t}={b}" for t, b in g.tags.items())
        figures = g.growth.as_dict(series=False) if g.growth else {}
        w.writerow([i, g.bytes, g.count, tags, *(figures.get(c, "") for c in GROWTH_COLUMNS),
                    " <- ".join(g.key) if report.by == "stack" else g.key[0]])
    return out.getvalue()


def to_folded(report: Report) -> str:
    """One line per group: frames outermost first, `;`-separated, then the outstanding bytes."""
    lines = []
    for g in report.groups:
        frames = [f.replace(";", ":").replace(" ", "_") for f in reversed(g.key)]
        lines.append(f"{';'.join(frames)} {g.bytes}")
    return "\n".join(lines) + ("\n" if lines else "")
