"""Analysis over a paired dataset: lifetime classes in a time window, filters, and outstanding
allocations grouped by stack, allocating function (call site), module or tag.

Outstanding = allocated inside the window and not freed by its end (WPA's AIFO). Lifetime classes for a
window [start, end): AIFI allocated and freed inside; AIFO allocated inside, freed after or never;
AOFI allocated before (or before the trace) and freed inside; AOFO allocated before, freed after or never.
Everything is vectorized over the allocation rows; frames are rendered (frames.FrameRenderer) only for the
distinct stacks that are shown. The dataset comes from datasetopen (columns read when used).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from pooltrace import pooltypes
from pooltrace.datasetopen import NULL_NS, Dataset, column_dtype
from pooltrace.errors import PooltraceError
from pooltrace.frames import FrameRenderer
from pooltrace.growth import Growth, GrowthCounts, class_rank, growth_table, times

LIFETIMES = ("AIFI", "AIFO", "AOFI", "AOFO")
AIFI, AIFO, AOFI, AOFO, OUTSIDE = 0, 1, 2, 3, -1
BY = ("stack", "function", "module", "tag")
# ---- window and lifetimes ----------------------------------------------------------------------------

@dataclass
class Window:
    start_ns: int
    end_ns: int


def parse_window(text: str | None, duration_ns: int | None) -> Window:
    """START:END in seconds (``1.5``, ``2s``) or nanoseconds (``1500000000ns``), either side optional."""
    end_default = (duration_ns if duration_ns is not None else np.iinfo(np.int64).max - 1) + 1
    if not text:
        return Window(0, end_default)
    if ":" not in text:
        raise PooltraceError(f"--window {text!r}: expected START:END (seconds, or ns with an 'ns' suffix)")
    a, b = text.split(":", 1)
    start = _time(a, 0)
    end = _time(b, end_default)
    if end <= start:
        raise PooltraceError(f"--window {text!r}: the end must be after the start")
    return Window(start, end)


def _time(s: str, default: int) -> int:
    s = s.strip()
    if not s:
        return default
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(ns|ms|us|s)?", s)
    if not m:
        raise PooltraceError(f"--window: bad time {s!r} (use seconds like 1.5 or 2s, or 1500000ns)")
    scale = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": 1_000_000_000, None: 1_000_000_000}[m.group(2)]
    return round(float(m.group(1)) * scale) if scale != 1 else int(float(m.group(1)))


# class by (allocation, free) position: 0 before the window (allocation unknown: before), 1 inside, 2 after
# (free unknown: never freed, after); an allocation after the window, or freed before it, is OUTSIDE
_CLASS = np.array([OUTSIDE, AOFI, AOFO, OUTSIDE, AIFI, AIFO, OUTSIDE, OUTSIDE, OUTSIDE], dtype=np.int8)
STEP = 1 << 18  # rows per step of the row-wise passes: their temporaries stay in the CPU caches


def lifetimes(rows: dict[str, np.ndarray], w: Window) -> np.ndarray:
    """Each row's lifetime class in the window (AIFI, AIFO, AOFI, AOFO or OUTSIDE)."""
    a, f = rows["alloc_ns"], rows["free_ns"]
    out = np.empty(len(a), dtype=np.int8)
    for lo in range(0, len(a), STEP):
        ap, fp = a[lo:lo + STEP], f[lo:lo + STEP]
        pos = (ap >= w.start_ns).view(np.int8) * 3  # NULL_NS (unknown) is before every window
        pos += (ap >= w.end_ns).view(np.int8) * 3
        pos += fp >= w.start_ns
        pos += fp >= w.end_ns
        pos += (fp == NULL_NS).view(np.int8) * 2  # never freed: after the window
        np.take(_CLASS, pos, out=out[lo:lo + STEP])
    return out


def lifetime_totals(size: np.ndarray, cls: np.ndarray) -> dict:
    """Count and bytes per lifetime class (rows OUTSIDE left out)."""
    counts, nbytes = np.zeros(5, dtype=np.int64), np.zeros(5)
    _add_classes(counts, nbytes, size, cls)
    return _totals(counts, nbytes)


def _add_classes(counts: np.ndarray, nbytes: np.ndarray, size: np.ndarray, cls: np.ndarray) -> None:
    """Add the rows' count and bytes per class + 1 (0: OUTSIDE) to `counts` and `nbytes`."""
    for lo in range(0, len(cls), STEP):
        k = cls[lo:lo + STEP].astype(np.intp) + 1
        counts += np.bincount(k, minlength=5)
        nbytes += np.bincount(k, weights=size[lo:lo + STEP].astype(np.float64), minlength=5)


def _totals(counts: np.ndarray, nbytes: np.ndarray) -> dict:
    return {name: {"count": int(counts[k + 1]), "bytes": int(nbytes[k + 1])} for k, name in enumerate(LIFETIMES)}


# ---- filters ----------------------------------------------------------------------------------------

def tag_matcher(patterns: list[str]) -> Callable[[str], bool]:
    """poolmon-style: `?` one character, `*` the rest; case-sensitive; patterns shorter than 4 characters
    without `*` are space-padded like tags."""
    compiled = []
    for p in patterns:
        pad = p if "*" in p or len(p) >= 4 else p.ljust(4)
        compiled.append(re.compile(fnmatch.translate(pad.replace("[", "[[]"))))
    return lambda tag: any(c.match(tag) for c in compiled)


@dataclass
class Filters:
    tags: list[str] = field(default_factory=list)
    pool: str | None = None  # paged | nonpaged | session
    pids: list[int] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)  # call-site module names (case-insensitive)
    min_bytes: int = 0


def row_mask(ds: Dataset, f: Filters) -> np.ndarray:
    return _mask(ds, ds.rows, ds.n, f)


def _mask(ds: Dataset, r: dict[str, np.ndarray], n: int, f: Filters) -> np.ndarray:
    """The rows (columns `r`, `n` rows) the tag, pool and pid filters keep."""
    mask = np.ones(n, dtype=bool)
    if f.tags:
        match = tag_matcher(f.tags)
        ok = np.array([match(t) for t in ds.tags], dtype=bool)
        mask &= ok[r["tag"]] if len(ok) else False
    if f.pool is not None:
        mask &= pooltypes.filter_mask(f.pool, r["pool_type"], r["session"])
    if f.pids:
        mask &= np.isin(r["pid"], f.pids)
    return mask


def _filter_columns(f: Filters) -> list[str]:
    return ["tag"] + (["pool_type", "session"] if f.pool is not None else [])


# ---- grouping ---------------------------------------------------------------------------------------

@dataclass
class Group:
    key: list[str]  # frames innermost first (by stack) or the single key
    count: int
    bytes: int
    tags: dict[str, int]
    stack_ids: list[int]
    first_row: int  # a representative row (for pid / time when rendering)
    growth: Growth | None = None  # set by build_report (growth.py)


def _unique(keys: np.ndarray, first: bool = False) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """np.unique(keys, return_index=first, return_inverse=True) of integer keys (inverse flat): counted
    per possible key instead of sorted when the keys' range is not much wider than their number."""
    n = len(keys)
    lo, hi = (int(keys.min()), int(keys.max()) + 1) if n else (0, 0)
    if not n or hi - lo > 4 * n + 65536:
        out = np.unique(keys, return_index=first, return_inverse=True)
        return out[0], (out[1] if first else None), out[-1].reshape(-1)
    present = np.bincount(keys - lo, minlength=hi - lo) > 0
    uniq = np.flatnonzero(present)
    inv = (np.cumsum(present) - 1)[keys - lo]
    where = None
    if first:  # the first occurrence of each key, as np.unique's return_index
        where = np.full(len(uniq), n, dtype=np.intp)
        np.minimum.at(where, inv, np.arange(n, dtype=np.intp))
    return (uniq + lo).astype(keys.dtype), where, inv


def outstanding_groups(ds: Dataset, sel: np.ndarray, by: str, render: FrameRenderer, f: Filters,
                       top: int | None = None) -> list[Group]:
    """Group the rows `sel` (indices) by `by`; filters on call-site module and min bytes; sorted by bytes."""
    r = ds.rows
    out = {name: r[name][sel] for name in OUT_COLUMNS}
    return _groups(ds, per_key(sel, out, by, ds.tags), by, render, f, top)


OUT_COLUMNS = ["alloc_stack", "size", "tag", "pid", "alloc_ns"]  # what grouping needs of the outstanding rows


@dataclass
class PerKey:
    """The outstanding rows reduced per group key (a stack id; a tag index with --by tag): what grouping
    needs of them. A dataset's summary (pooltrace.summary) holds the one by stack of the default report."""
    keys: np.ndarray  # int64, the distinct keys, ascending
    counts: np.ndarray  # int64, rows per key
    nbytes: np.ndarray  # int64, their bytes
    first_row: np.ndarray  # int64, each key's first outstanding row (its row number in the dataset) ...
    stack: np.ndarray  # int64, ... and that row's stack,
    pid: np.ndarray  # uint32, pid
    alloc_ns: np.ndarray  # int64, and allocation time
    pair_key: np.ndarray  # int64, (key, tag) pairs, ascending: index into `keys`,
    pair_tag: np.ndarray  # int64, index into `tag_names`,
    pair_bytes: np.ndarray  # int64, and the pair's bytes
    tag_names: list[str]


def per_key(sel: np.ndarray, out: dict[str, np.ndarray], by: str, tag_names: list[str]) -> PerKey:
    """PerKey of the outstanding rows `sel` from their OUT_COLUMNS `out` (tag: indices into `tag_names`)."""
    stack = out["alloc_stack"]
    size = out["size"].astype(np.int64)
    tags = out["tag"]
    gkey = tags.astype(np.int64) if by == "tag" else stack
    uniq, first, inv = _unique(gkey, first=True)
    counts = np.bincount(inv, minlength=len(uniq)).astype(np.int64)
    nbytes = np.bincount(inv, weights=size, minlength=len(uniq)).astype(np.int64)
    # per-(group, tag) bytes
    tag_pairs = inv.astype(np.int64) * (len(tag_names) + 1) + tags
    tp, _, tp_inv = _unique(tag_pairs)
    tp_bytes = np.bincount(tp_inv, weights=size, minlength=len(tp)).astype(np.int64)
    pair_key, pair_tag = np.divmod(tp.astype(np.int64), len(tag_names) + 1)
    return PerKey(uniq.astype(np.int64), counts, nbytes, sel[first].astype(np.int64), stack[first].astype(np.int64),
                  out["pid"][first], out["alloc_ns"][first], pair_key, pair_tag, tp_bytes, tag_names)


def _groups(ds: Dataset, pk: PerKey, by: str, render: FrameRenderer, f: Filters,
            top: int | None = None) -> list[Group]:
    """The groups of the outstanding rows reduced per key (`pk`); filters on call-site module and min
    bytes; sorted by bytes."""
    names = pk.tag_names
    group_tags: dict[int, dict[str, int]] = {}
    for g, t, b in zip(pk.pair_key.tolist(), pk.pair_tag.tolist(), pk.pair_bytes.tolist(), strict=True):
        group_tags.setdefault(g, {})[names[t]] = b
    pid = pk.pid
    ans = pk.alloc_ns
    if by != "tag":  # every group's stack rendered in one pass, with its representative row's pid and time
        rep_pids = pid.astype(np.int64)
        render.prepare(pk.stack, np.where(rep_pids != 0xFFFFFFFF, rep_pids, 0), np.where(ans != NULL_NS, ans, 0))
    groups: dict[tuple, Group] = {}
    want_mod = {m.lower() for m in f.modules}
    # per group, as Python ints: its representative row's pid, time, stack and row number, its key, totals
    per_group = zip(pid.tolist(), ans.tolist(), pk.stack.tolist(), pk.first_row.tolist(),
                    pk.keys.tolist(), pk.counts.tolist(), pk.nbytes.tolist(), strict=True)
    for g, (rep_pid, rep_ns, sid, row, code, count, size_g) in enumerate(per_group):
        rep_pid = rep_pid if rep_pid != 0xFFFFFFFF else 0
        rep_ns = rep_ns if rep_ns != NULL_NS else 0
        if by == "tag":
            key = [names[code]]
            mod_name = None
        else:
            site, mod_name = render.call_site(sid, rep_pid, rep_ns)
            if by == "stack":
                texts = render.stack(sid, rep_pid, rep_ns)[0] if sid >= 0 else []
                key = texts or ["<no stack>"]
            elif by == "function":
                key = [site]
            else:
                key = [mod_name]
        if want_mod and by != "tag" and (mod_name or "").lower() not in want_mod:
            continue
        k = tuple(key)
        cur = groups.get(k)
        if cur is None:
            groups[k] = Group(list(key), count, size_g, dict(group_tags.get(g, {})), [sid], row)
        else:
            cur.count += count
            cur.bytes += size_g
            cur.stack_ids.append(sid)
            for t, b in group_tags.get(g, {}).items():
                cur.tags[t] = cur.tags.get(t, 0) + b
    out = [g for g in groups.values() if g.bytes >= f.min_bytes]
    out.sort(key=lambda g: (-g.bytes, -g.count, g.key))
    for g in out:
        g.tags = dict(sorted(g.tags.items(), key=lambda kv: (-kv[1], kv[0])))
    return out[:top] if top else out


@dataclass
class Report:
    trace: dict
    window: Window
    lifetimes: dict
    outstanding_count: int
    outstanding_bytes: int
    by: str
    groups: list[Group]
    rows: np.ndarray | None  # indices of the outstanding rows (after filters); None: not read (summary)
    times_ns: list[int] = field(default_factory=list)  # the time of each point of the groups' growth series
    sort: str = "bytes"
    likely: list[Group] = field(default_factory=list)  # likely leaks among ALL groups (leak, then growing)
    frame_rvas: dict[str, int] = field(default_factory=dict)  # frame text -> module-relative address
    hidden_groups: int = 0  # groups left out by --top / --min-bytes ...
    hidden_bytes: int = 0  # ... and their outstanding bytes
    hidden_reason: str = ""
    notices: dict = field(default_factory=dict)  # verdict, warnings, symbols: what every format must say


LIKELY_LEAKS = 10


SORTS = ("bytes", "growth")


def effective_end(ds: Dataset, window: Window) -> int:
    """The window's end clipped to the trace (a window without an end stops where the trace stops)."""
    dur = ds.trace.get("duration_ns")
    if dur is None:
        a = ds.rows["alloc_ns"]
        dur = int(a[a != NULL_NS].max()) if (a != NULL_NS).any() else window.start_ns
    return end_within(window, dur)


def end_within(window: Window, duration_ns: int) -> int:
    """The window's end clipped to a trace lasting `duration_ns` (its last event inside)."""
    return max(window.start_ns + 1, min(window.end_ns, int(duration_ns) + 1))


def attach_growth(ds: Dataset, mask: np.ndarray, groups: list[Group], by: str, window: Window) -> list[int]:
    """Compute every group's growth (one pass over the window's rows); returns the series' times."""
    r = ds.rows
    end = effective_end(ds, window)
    lookup = _group_of_key(ds, groups, by)
    # stack ids index the lookup directly; -1 (no stack) wraps to its last slot
    gid = lookup[r["tag"]] if by == "tag" else np.take(lookup, r["alloc_stack"], mode="wrap")
    if not mask.all():
        gid = np.where(mask, gid, -1)
    table = growth_table(r["alloc_ns"], r["free_ns"], r["size"], gid, len(groups), window.start_ns, end, NULL_NS)
    for g, gr in zip(groups, table, strict=True):
        g.growth = gr
    return times(window.start_ns, end).tolist()


def sort_groups(groups: list[Group], sort: str) -> list[Group]:
    """`bytes`: outstanding bytes, largest first; `growth`: leak, growing, plateau, transient, each by
    bytes/s (fastest growth first)."""
    if sort == "growth":
        return sorted(groups, key=lambda g: (class_rank(g.growth), -(g.growth.bytes_per_s if g.growth else 0),
                                             -g.bytes, g.key))
    return groups


@dataclass
class _Scan:
    """What one pass over the allocation rows gives a report."""
    end_ns: int  # the window's end clipped to the trace
    counts: np.ndarray  # rows per lifetime class + 1 (0: OUTSIDE or filtered out)
    nbytes: np.ndarray  # their bytes
    sel: np.ndarray  # indices of the outstanding (AIFO) rows the filters keep
    out: dict[str, np.ndarray]  # their OUT_COLUMNS
    growth: GrowthCounts  # every kept row binned per growth key (_keys)


def _scan(ds: Dataset, window: Window, by: str, f: Filters) -> _Scan:
    """One pass over the rows, part by part (Rows.blocks): lifetime classes and their totals, the outstanding
    rows and their columns, and growth counts per stack (per tag with --by tag), which the groups sum once
    they are known. Memory follows the outstanding rows and the stacks, not the allocations."""
    end = effective_end(ds, window)
    keys = len(ds.tags) + 1 if by == "tag" else len(ds.stacks) + 1
    counts = GrowthCounts(keys, window.start_ns, end, NULL_NS)
    n_cls, b_cls = np.zeros(5, dtype=np.int64), np.zeros(5)
    sels: list[np.ndarray] = []
    outs: dict[str, list[np.ndarray]] = {name: [] for name in OUT_COLUMNS}
    names = list(dict.fromkeys([*OUT_COLUMNS, "free_ns", *_filter_columns(f)]))
    for at, cols in ds.rows.blocks(names):
        k = len(cols["size"])
        mask = _mask(ds, cols, k, f)
        cls = lifetimes(cols, window)
        _add_classes(n_cls, b_cls, cols["size"], np.where(mask, cls, OUTSIDE))
        hit = np.flatnonzero(mask & (cls == AIFO))
        sels.append(hit + at)
        for name in OUT_COLUMNS:
            outs[name].append(cols[name][hit])
        key = _keys(cols, by, keys)
        counts.add(cols["alloc_ns"], cols["free_ns"], cols["size"], key if mask.all() else np.where(mask, key, -1))
    sel = np.concatenate(sels) if sels else np.zeros(0, dtype=np.intp)
    out = {name: np.concatenate(parts) if parts else
           np.zeros(0, dtype=column_dtype(name) if name != "tag" else np.int32) for name, parts in outs.items()}
    return _Scan(end, n_cls, b_cls, sel, out, counts)


def _keys(cols: dict[str, np.ndarray], by: str, keys: int) -> np.ndarray:
    """Each row's growth key: its tag, or its stack (no stack, -1, is the last key: the stack lookup's wrap)."""
    if by == "tag":
        return cols["tag"]
    stack = cols["alloc_stack"]
    if not len(stack) or stack.min() >= -1:
        return np.where(stack >= 0, stack, keys - 1)
    return np.mod(stack, keys)  # damaged references below -1: wrapped like np.take(mode="wrap")


def _group_of_key(ds: Dataset, groups: list[Group], by: str) -> np.ndarray:
    """Per growth key (_keys), the index of its group in `groups` (-1: none)."""
    if by == "tag":
        code = {t: i for i, t in enumerate(ds.tags)}
        lookup = np.full(len(ds.tags) + 1, -1, dtype=np.int32)
        for gi, g in enumerate(groups):
            lookup[code[g.key[0]]] = gi
        return lookup
    lookup = np.full(len(ds.stacks) + 1, -1, dtype=np.int32)
    for gi, g in enumerate(groups):
        lookup[np.asarray(g.stack_ids, dtype=np.int64)] = gi  # -1 (no stack): the last key
    return lookup


def _summary(ds: Dataset, window: Window, by: str, f: Filters, warn: Callable[[str], None] | None):
    """The dataset's summary (pooltrace.summary) when it answers this report: by stack, function or module,
    the whole trace, no tag, pool or pid filter (the group filters apply to its groups as to any)."""
    duration = ds.trace.get("duration_ns")
    if by == "tag" or f.tags or f.pool is not None or f.pids or not ds.whole or duration is None \
            or window != parse_window(None, duration):
        return None
    if ds.summary is False:  # not read yet
        from pooltrace.summary import read_summary

        ds.summary, problem = read_summary(ds)
        if problem and warn is not None:
            warn(f"{problem}; the report reads the allocation rows instead (re-run `pooltrace pair`)")
    s = ds.summary
    return s if s is not None and s.window == Window(window.start_ns, effective_end(ds, window)) else None


def build_report(ds: Dataset, *, window: Window, by: str, filters: Filters, render: FrameRenderer,
                 top: int | None, sort: str = "bytes", summary: bool = True,
                 warn: Callable[[str], None] | None = None) -> Report:
    """The report. `summary`: may read the dataset's summary instead of its rows where it answers the same
    (_summary); the Report's `rows` (the outstanding rows) is then None."""
    s = _summary(ds, window, by, filters, warn) if summary else None
    if s is not None:
        end_ns, n_cls, b_cls, pk, growth, sel = s.window.end_ns, s.lifetime_counts, s.lifetime_bytes, s.per_key, \
            s.growth, None
    else:
        scan = _scan(ds, window, by, filters)
        end_ns, n_cls, b_cls, growth, sel = scan.end_ns, scan.counts, scan.nbytes, scan.growth, scan.sel
        pk = per_key(scan.sel, scan.out, by, ds.tags)
    every = _groups(ds, pk, by, render, replace(filters, min_bytes=0), None)
    lookup = _group_of_key(ds, every, by)
    for g, gr in zip(every, growth.growth(s.growth_keys(lookup) if s is not None else lookup, len(every)),
                     strict=True):
        g.growth = gr
    times_ns = times(window.start_ns, end_ns).tolist()
    groups = [g for g in every if g.bytes >= filters.min_bytes]
    likely = [g for g in sort_groups(groups, "growth") if g.growth.cls in ("leak", "growing")][:LIKELY_LEAKS]
    groups = sort_groups(groups, sort)
    total_count, total_bytes = int(pk.counts.sum()), int(pk.nbytes.sum())
    if filters.modules or filters.min_bytes:  # totals follow the group filters
        keep = set()
        for g in groups:
            keep.update(g.stack_ids)
        if by != "tag" and filters.modules:
            kept = np.isin(pk.keys, list(keep))
            total_count, total_bytes = int(pk.counts[kept].sum()), int(pk.nbytes[kept].sum())
            if sel is not None:
                sel = sel[np.isin(scan.out["alloc_stack"], list(keep))]
    shown = groups[:top] if top else groups
    reasons = ([f"--min-bytes {filters.min_bytes:,}"] if len(groups) < len(every) else []) + \
        ([f"--top {top}"] if len(shown) < len(groups) else [])
    hidden = len(every) - len(shown)
    return Report(ds.trace, window, _totals(n_cls, b_cls), total_count, total_bytes, by, shown, sel,
                  times_ns, sort, likely, render.rvas, hidden,
                  sum(g.bytes for g in every) - sum(g.bytes for g in shown), ", ".join(reasons))


# ---- the poolmon view --------------------------------------------------------------------------------

@dataclass
class TagRow:
    tag: str
    pool: str  # the pool: one of pooltypes.KINDS (NonPaged, NonPagedNx, Paged, Session)
    allocs: int
    frees: int
    outstanding_bytes: int
    outstanding_count: int
    allocated_bytes: int
    owners: list[str]  # call-site modules, most allocations first
    in_use_start_bytes: int | None = None  # bytes in use at the trace's start / stop by the baseline
    in_use_end_bytes: int | None = None  # (None: no baseline for this tag and pool)

    @property
    def diff(self) -> int:
        return self.allocs - self.frees

    @property
    def per_alloc(self) -> int:
        return self.allocated_bytes // self.allocs if self.allocs else 0


def tag_rows(ds: Dataset, window: Window, filters: Filters, render: FrameRenderer) -> list[TagRow]:
    """Per tag and pool kind, over the window: allocations and frees inside it, the difference, bytes
    still outstanding (AIFO), bytes per allocation and the modules whose call sites allocate the tag."""
    r = ds.rows
    mask = row_mask(ds, filters)
    a, f = r["alloc_ns"], r["free_ns"]
    alloc_in = mask & (a != NULL_NS) & (a >= window.start_ns) & (a < window.end_ns)
    # a lost free has no free event: it is not counted as a free (its free time closes its lifetime)
    free_in = mask & (f != NULL_NS) & (f >= window.start_ns) & (f < window.end_ns) & ~r["lost_free"]
    cls = lifetimes(r, window)
    kind = pooltypes.kind_codes(r["pool_type"], r["session"])
    nk = len(pooltypes.KINDS)
    key = r["tag"].astype(np.int64) * nk + kind
    size = r["size"].astype(np.int64)
    rows = []
    for k in np.unique(key[alloc_in | free_in]).tolist():
        sel = key == k
        ai, fi = sel & alloc_in, sel & free_in
        out = ai & (cls == AIFO)
        owners: dict[str, int] = {}
        stacks, first = np.unique(r["alloc_stack"][ai], return_index=True)
        counts = np.bincount(np.unique(r["alloc_stack"][ai], return_inverse=True)[1].reshape(-1)) if ai.any() else []
        idx = np.flatnonzero(ai)
        for sid, fi_, c in zip(stacks.tolist(), first.tolist(), list(counts), strict=False):
            if sid < 0:
                continue
            row = idx[fi_]
            _, mod = render.call_site(sid, int(r["pid"][row]) if r["pid"][row] != 0xFFFFFFFF else 0,
                                      int(r["alloc_ns"][row]))
            owners[mod] = owners.get(mod, 0) + int(c)
        t, kd = divmod(k, nk)
        start, end = _in_use(ds.trace.get("tag_baseline") or {}, ds.tags[t], kd)
        rows.append(TagRow(ds.tags[t], pooltypes.KINDS[kd], int(ai.sum()), int(fi.sum()),
                           int(size[out].sum()), int(out.sum()), int(size[ai].sum()),
                           [m for m, _ in sorted(owners.items(), key=lambda kv: (-kv[1], kv[0]))], start, end))
    rows.sort(key=lambda x: (-x.outstanding_bytes, -x.diff, x.tag))
    return rows


def _in_use(baseline: dict, tag: str, kind: int) -> tuple[int | None, int | None]:
    """Bytes of `tag` in use at the start and the stop by the baseline, for a pooltypes kind: the kernel
    counts paged and non-paged (NX or not) bytes per tag, and session pool in session snapshots only."""
    b = baseline.get(tag)
    if not b:
        return None, None
    key = {pooltypes.PAGED_KIND: "paged_bytes", pooltypes.SESSION_KIND: "session_bytes"}.get(kind, "nonpaged_bytes")
    return tuple((b[w] or {}).get(key) for w in ("start", "stop"))
