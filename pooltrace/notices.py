"""What every report must say besides its numbers: the trace's verdict when it cannot show pool leaks,
the damage and losses `pair` stored in trace.json, filters that match nothing (with the closest names),
rows a report does not show, and modules left without symbols. Pure functions over trace.json and the
dataset; the CLI prints them and the reporters put them in every format."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np

from pooltrace.analysis import Filters, tag_matcher
from pooltrace.datasetopen import Dataset
from pooltrace.verdicts import no_pool_verdict

NO_POOL_EVENTS = no_pool_verdict(0)


def pool_event_count(trace: dict) -> int:
    p = trace.get("pairing") or {}
    return int(p.get("allocs") or 0) + int(p.get("frees") or 0)


def pool_verdict(trace: dict) -> str | None:
    """`info`'s verdict when the trace cannot answer a pool question, else None."""
    if pool_event_count(trace) == 0:  # info's wording, from what pair stored in trace.json
        return no_pool_verdict(0, trace.get("kernel_events"), trace.get("logger"),
                               trace.get("pool_tracing_enabled"), bool(trace.get("warnings")))
    p = trace.get("pairing") or {}
    if p.get("allocs") and not p.get("allocations_with_stack"):
        return ("pool events without stacks: leaks can be found by tag but not by call stack; record with pool "
                "stacks (`pooltrace record` enables them)")
    return None


def trace_warnings(trace: dict) -> list[str]:
    """Damage and losses the reader and `pair` found, one sentence each (empty for a clean trace)."""
    out = [str(w) for w in trace.get("warnings") or []]
    lost = trace.get("lost") or {}
    if lost.get("events") or lost.get("buffers"):
        out.append(f"{lost.get('events', 0):,} events and {lost.get('buffers', 0):,} buffers were lost while "
                   "recording; counts may be incomplete")
    p = trace.get("pairing") or {}
    if (p.get("buffers_unreadable") or p.get("bytes_skipped")) and not trace.get("warnings"):
        out.append(f"{p.get('buffers_unreadable', 0):,} buffers unreadable, {p.get('bytes_skipped', 0):,} bytes "
                   "skipped: the trace is damaged; frees may be missing and leaks look bigger")
    return out


def closest(word: str, choices: list[str], n: int = 3) -> list[str]:
    """The names most like `word` (case-insensitive), best first."""
    folded = {c.lower(): c for c in sorted(set(choices))}
    hits = difflib.get_close_matches(word.lower(), list(folded), n=n, cutoff=0.5)
    return [folded[h] for h in hits]


def unmatched_tags(patterns: list[str], tags: list[str]) -> list[str]:
    """One message per --tag pattern that matches no tag of the trace, naming the closest tags."""
    out = []
    for p in patterns:
        match = tag_matcher([p])
        if any(match(t) for t in tags):
            continue
        near = closest(p.strip("*?"), [t.strip() for t in tags])
        out.append(f"--tag {p!r} matches no tag in this trace" +
                   (f"; closest: {', '.join(near)}" if near else "") + " (tags are case-sensitive)")
    return out


def unmatched_modules(names: list[str], modules: list[str]) -> list[str]:
    have = {m.lower() for m in modules if m}
    out = []
    for name in names:
        if name.lower() in have:
            continue
        near = closest(name, [m for m in modules if m])
        out.append(f"--module {name!r} is no module of this trace" + (f"; closest: {', '.join(near)}" if near else ""))
    return out


def unmatched_filters(datasets: list[Dataset], f: Filters) -> list[str]:
    """Filters that match nothing in any of `datasets` (a tag gone from one side of a diff is fine)."""
    tags = sorted({t for ds in datasets for t in ds.tags}) if f.tags else []  # the tag column: only when asked
    mods: set[str] = set()
    for ds in datasets:
        if ds.modules.num_rows:
            mods.update(n for n in ds.modules["name"].to_pylist() if n)
    return unmatched_tags(f.tags, tags) + unmatched_modules(f.modules, sorted(mods)) + unmatched_pids(f.pids, datasets)


def unmatched_pids(pids: list[int], datasets: list[Dataset]) -> list[str]:
    """One message per --pid that allocated nothing in any of `datasets` (was an empty report, exit 0)."""
    if not pids:
        return []
    seen = {int(p) for ds in datasets for p in np.unique(ds.rows["pid"])}
    return [f"--pid {p} allocated nothing in this trace" for p in pids if p not in seen]


@dataclass
class Hidden:
    """Rows a report left out (`--top`, `--min-bytes`, the `--list` cap)."""
    count: int = 0
    bytes: int = 0
    what: str = "groups"
    why: str = ""

    def sentence(self) -> str | None:
        if not self.count:
            return None
        return (f"{self.count:,} more {self.what}, {self.bytes:,} bytes not shown" +
                (f" ({self.why})" if self.why else ""))

    def as_dict(self) -> dict:
        return {"count": self.count, "bytes": self.bytes, "reason": self.why}


def missing_symbols(status: list[dict]) -> str | None:
    """One summary line for modules whose frames stay unsymbolized, or None."""
    missing = sorted({s["module"] for s in status if s.get("status") not in ("found", "disabled")})
    if not missing:
        return None
    names = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
    return (f"no PDB for {len(missing)} module{'s' if len(missing) != 1 else ''} ({names}); frames show "
            "module+0xrva: set --symbols or _NT_SYMBOL_PATH")
