"""Compare two runs: outstanding allocations grouped the same way on both sides and matched by their
module-relative frames (never by address: the runs come from different boots), with a status per group
and totals per side and per tag.

Matching survives a rebuild: a symbolized frame matches by `module!function` (its `+0xoff` changes when
the function's code changes; it is still shown), an unsymbolized one by `module+0xrva` (which moves with
any rebuild: such frames need symbols to match across builds), a frame outside every module by its text.
Groups of one side whose match keys are equal (the same stack through other offsets) are merged.

Status: `new` (only in NEW), `gone` (only in BASE), `grown`, `shrunk`, `same` (by outstanding bytes).
`--normalize` scales BASE to NEW's duration (or to its allocation count) before comparing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pooltrace.analysis import Group, Report
from pooltrace.errors import PooltraceError
from pooltrace.growth import Growth
from pooltrace.sizes import parse_size

STATUS_ORDER = {"new": 0, "grown": 1, "same": 2, "shrunk": 3, "gone": 4}


def match_frame(frame: str) -> str:
    """The part of a frame text that survives a rebuild: `module!function` for a symbolized frame."""
    return frame.rsplit("+0x", 1)[0] if "!" in frame else frame


def match_key(frames: list[str]) -> tuple[str, ...]:
    """The key two runs' groups are matched by (frames innermost first, or a single key)."""
    return tuple(match_frame(f) for f in frames)


@dataclass
class DiffGroup:
    frames: list[str]  # as shown: NEW's frames when the group is in NEW, else BASE's
    base_count: float
    base_bytes: float
    new_count: int
    new_bytes: int
    base_tags: dict[str, int]
    new_tags: dict[str, int]
    base_frames: list[str] | None = None  # BASE's frames (offsets of the old build) when in BASE
    base_growth: Growth | None = None  # of the largest BASE group merged here
    new_growth: Growth | None = None

    @property
    def delta_count(self) -> float:
        return self.new_count - self.base_count

    @property
    def delta_bytes(self) -> float:
        return self.new_bytes - self.base_bytes

    @property
    def status(self) -> str:
        if self.base_count == 0 and self.new_count > 0:
            return "new"
        if self.new_count == 0 and self.base_count > 0:
            return "gone"
        if self.new_bytes > self.base_bytes:
            return "grown"
        if self.new_bytes < self.base_bytes:
            return "shrunk"
        return "same"


@dataclass
class Diff:
    base: Report
    new: Report
    scale: float  # applied to BASE
    normalize: str | None
    groups: list[DiffGroup]

    @property
    def base_bytes(self) -> float:
        return self.base.outstanding_bytes * self.scale

    @property
    def base_count(self) -> float:
        return self.base.outstanding_count * self.scale

    def tags(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for g in self.groups:
            for t, b in g.base_tags.items():
                out.setdefault(t, {"base_bytes": 0.0, "new_bytes": 0})["base_bytes"] += b * self.scale
            for t, b in g.new_tags.items():
                out.setdefault(t, {"base_bytes": 0.0, "new_bytes": 0})["new_bytes"] += b
        for v in out.values():
            v["delta_bytes"] = v["new_bytes"] - v["base_bytes"]
        return dict(sorted(out.items(), key=lambda kv: -kv[1]["delta_bytes"]))


def scale_for(base: Report, new: Report, normalize: str | None) -> float:
    if normalize is None:
        return 1.0
    if normalize == "duration":
        b = base.window.end_ns - base.window.start_ns
        n = new.window.end_ns - new.window.start_ns
        b = min(b, (base.trace.get("duration_ns") or b) + 1)
        n = min(n, (new.trace.get("duration_ns") or n) + 1)
        if b <= 0:
            raise PooltraceError("--normalize: BASE has no duration")
        return n / b
    if normalize == "allocs":
        b = base.trace.get("pairing", {}).get("allocs", 0)
        n = new.trace.get("pairing", {}).get("allocs", 0)
        if not b:
            raise PooltraceError("--normalize=allocs: BASE has no allocations")
        return n / b
    raise PooltraceError(f"--normalize: unknown mode {normalize!r}")


def diff_reports(base: Report, new: Report, normalize: str | None = None) -> Diff:
    scale = scale_for(base, new, normalize)
    by_key: dict[tuple, DiffGroup] = {}
    for g in base.groups:  # largest first: a merged group shows the frames and growth of its largest part
        d = by_key.get(match_key(g.key))
        if d is None:
            by_key[match_key(g.key)] = DiffGroup(list(g.key), g.count * scale, g.bytes * scale, 0, 0, dict(g.tags),
                                                 {}, list(g.key), g.growth)
        else:
            d.base_count += g.count * scale
            d.base_bytes += g.bytes * scale
            _add_tags(d.base_tags, g)
    for g in new.groups:
        d = by_key.get(match_key(g.key))
        if d is None:
            by_key[match_key(g.key)] = d = DiffGroup(list(g.key), 0, 0, 0, 0, {}, {})
        if d.new_count == 0 and d.new_bytes == 0:
            d.frames, d.new_growth = list(g.key), g.growth
        d.new_count += g.count
        d.new_bytes += g.bytes
        _add_tags(d.new_tags, g)
    groups = sorted(by_key.values(), key=lambda d: (-d.delta_bytes, STATUS_ORDER[d.status], d.frames))
    return Diff(base, new, scale, normalize, groups)


def _add_tags(into: dict[str, int], g: Group) -> None:
    for t, b in g.tags.items():
        into[t] = into.get(t, 0) + b


def parse_threshold(text: str) -> tuple[float, bool]:
    """`4096`, `64k`, `1.5MB` (bytes, the one size parser) or `10%` -> (value, is_percent)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%\s*", text)
    if m:
        return float(m.group(1)), True
    try:
        return float(parse_size(text)), False
    except ValueError:
        raise PooltraceError(f"--fail-on-growth {text!r}: give bytes (4096, 64k, 1.5MB) or a percentage (10%)"
                             ) from None


def gate(d: Diff, threshold: str, per_group: bool) -> str | None:
    """The reason the CI gate fails, or None. Growth past the threshold (bytes, or % of BASE)."""
    value, percent = parse_threshold(threshold)

    def over(base: float, new: float) -> bool:
        growth = new - base
        if percent:
            return growth > 0 and (base == 0 or growth > base * value / 100)
        return growth > value

    if over(d.base_bytes, d.new.outstanding_bytes):
        return (f"outstanding bytes grew by {d.new.outstanding_bytes - d.base_bytes:,.0f} "
                f"({d.base_bytes:,.0f} -> {d.new.outstanding_bytes:,}), more than {threshold}")
    if per_group:
        for g in d.groups:
            if over(g.base_bytes, g.new_bytes):
                head = " <- ".join(g.frames[:3]) + (" ..." if len(g.frames) > 3 else "")
                return (f"group {head} ({g.status}) grew by {g.delta_bytes:,.0f} bytes "
                        f"({g.base_bytes:,.0f} -> {g.new_bytes:,}), more than {threshold}")
    return None
