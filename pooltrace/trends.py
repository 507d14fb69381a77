"""A trend across N runs in order (builds, days, machines): per group, its outstanding bytes and blocks in
every run, the run where it first appears or starts growing, and a status.

Groups are the report's (same ``by``, window and filters in every run) matched across runs with diff's
``compare.match_key``. With ``tolerance`` t (default 10 %), a step from one run to the next is *up* when
bytes grow by more than t, *down* when they fall by more than t, else *flat*. Statuses, from the runs'
point of view at the last run:

- ``fixed in run K``: present before, absent (0 bytes) from run K to the last run;
- ``new in run K``: absent in run K-1, present from run K to the last run (K > 1);
- ``growing across runs``: present in every run, and since the last *down* step it went *up* at least twice
  (once with only two runs) and never down, ending more than t above where that growth started; it "starts
  growing" at the first of those up steps;
- ``shrunk in run K``: present in every run, not growing, and more than t below its peak (its largest bytes
  in any run) from run K to the last run, but not in run K-1;
- ``stable``: everything else (present in every run, not growing, and the last run within t of its peak).

With only two runs there is one step: absent in run 2 is ``fixed in run 2``, absent in run 1 is ``new in run
2``, more than t up is ``growing across runs`` (from run 2), more than t down is ``shrunk in run 2``, and
anything within t is ``stable``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pooltrace.analysis import Report
from pooltrace.compare import diff_reports, gate, match_key

DEFAULT_TOLERANCE = 0.10
STATUS_ORDER = {"growing": 0, "new": 1, "stable": 2, "shrunk": 3, "fixed": 4}


@dataclass
class RunReport:
    """One run of the series: its name (run id or file name), where it came from, and its report."""

    name: str
    source: str
    report: Report
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class TrendGroup:
    frames: list[str]
    bytes: list[int]  # per run, in order
    counts: list[int]
    kind: str  # growing | new | stable | shrunk | fixed
    run: int | None  # 1-based: the run where it appears, starts growing, shrank or is fixed (None when stable)

    @property
    def status(self) -> str:
        return {"growing": "growing across runs", "stable": "stable", "new": f"new in run {self.run}",
                "shrunk": f"shrunk in run {self.run}", "fixed": f"fixed in run {self.run}"}[self.kind]

    @property
    def first_run(self) -> int:
        """The first run where the group appears, or where it starts growing."""
        if self.kind == "growing":
            return self.run  # type: ignore[return-value]
        return next(k for k, b in enumerate(self.bytes, 1) if b > 0)


@dataclass
class Trend:
    runs: list[RunReport]
    by: str
    tolerance: float
    groups: list[TrendGroup]


def classify(values: list[int], tolerance: float = DEFAULT_TOLERANCE) -> tuple[str, int | None]:
    """(kind, run) of one group's bytes per run (see the module docstring)."""
    n = len(values)
    present = [v > 0 for v in values]
    if not present[-1]:
        last = max(k for k in range(n) if present[k])
        return "fixed", last + 2
    start = n - 1
    while start > 0 and present[start - 1]:
        start -= 1
    if start > 0:
        return "new", start + 1
    steps = []
    for k in range(1, n):
        a, b = values[k - 1], values[k]
        steps.append(1 if b > a * (1 + tolerance) else -1 if b < a * (1 - tolerance) else 0)
    last_down = max((k for k, s in enumerate(steps) if s < 0), default=-1)
    ups = [k for k in range(last_down + 1, len(steps)) if steps[k] > 0]
    if ups and len(ups) >= min(2, n - 1) and values[-1] > values[ups[0]] * (1 + tolerance):
        return "growing", ups[0] + 2
    low = max(values) * (1 - tolerance)  # more than t below the peak
    if values[-1] < low:
        start = n - 1
        while start > 0 and values[start - 1] < low:
            start -= 1
        return "shrunk", start + 1
    return "stable", None


def build_trend(runs: list[RunReport], tolerance: float = DEFAULT_TOLERANCE) -> Trend:
    """Match the runs' groups and classify each; every run's report must be built with the same `by`."""
    n = len(runs)
    by_key: dict[tuple, TrendGroup] = {}
    for k, r in enumerate(runs):
        for g in r.report.groups:
            key = match_key(g.key)
            t = by_key.get(key)
            if t is None:
                t = by_key[key] = TrendGroup(list(g.key), [0] * n, [0] * n, "stable", None)
            t.bytes[k] += g.bytes
            t.counts[k] += g.count
            t.frames = list(g.key)  # shown as in the latest run that has it
    for t in by_key.values():
        t.kind, t.run = classify(t.bytes, tolerance)
    groups = sorted(by_key.values(), key=lambda t: (STATUS_ORDER[t.kind], -t.bytes[-1], -max(t.bytes), t.frames))
    return Trend(runs, runs[0].report.by if runs else "stack", tolerance, groups)


def reference_run(trend: Trend, against: str) -> int:
    """Index of the run the gate compares the last run with: the first, or the best (fewest bytes)."""
    if against == "first":
        return 0
    totals = [r.report.outstanding_bytes for r in trend.runs[:-1]]
    return min(range(len(totals)), key=lambda k: (totals[k], k))


def trend_gate(trend: Trend, threshold: str, against: str = "first", per_group: bool = False) -> str | None:
    """diff's CI gate between the reference run and the last one: the reason it fails, or None."""
    ref = reference_run(trend, against)
    reason = gate(diff_reports(trend.runs[ref].report, trend.runs[-1].report), threshold, per_group)
    if reason is None:
        return None
    return f"run {len(trend.runs)} ({trend.runs[-1].name}) against run {ref + 1} ({trend.runs[ref].name}): {reason}"
