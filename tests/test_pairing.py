"""Pairing invariants, property-tested on generated event streams against a direct statement of the
rules (one event at a time, a dict of open allocations)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pooltrace.etl.columns import Columns
from pooltrace.pairing import (
    CLOSED_FREE,
    CLOSED_LOST_FREE,
    FREE_WITHOUT_ALLOC,
    NO_TS,
    OUTSTANDING,
    Pairer,
    PoolEvents,
)

# (is_alloc, namespace, address) — few addresses and namespaces so that keys collide a lot
event = st.tuples(st.booleans(), st.sampled_from([0, 0, 0, 1, 2]), st.integers(0, 6))


def make_events(evs, ts0=0) -> PoolEvents:
    n = len(evs)
    return PoolEvents(
        ts=np.arange(ts0, ts0 + n, dtype=np.int64), alloc=np.array([e[0] for e in evs], dtype=bool),
        namespace=np.array([e[1] for e in evs], dtype=np.int64),
        address=np.array([0xFFFF800000000000 + 16 * e[2] for e in evs], dtype=np.uint64),
        tag=np.full(n, 0x6B61654C, dtype=np.uint32), pool_type=np.zeros(n, dtype=np.uint32),
        size=np.arange(1, n + 1, dtype=np.uint64) + ts0, session_id=np.array([max(e[1] - 1, 0) for e in evs],
                                                                            dtype=np.uint32),
        cpu=np.zeros(n, dtype=np.uint16), pid=np.zeros(n, dtype=np.uint32), tid=np.zeros(n, dtype=np.uint32),
        stack=np.arange(ts0, ts0 + n, dtype=np.int64))


def reference(evs):
    """The rules, one event at a time: (alloc time, free time, kind) rows, -1 for a missing time."""
    open_: dict = {}
    rows = []
    for t, (is_alloc, ns, addr) in enumerate(evs):
        key = (ns, addr)
        if is_alloc:
            if key in open_:
                rows.append((open_.pop(key), t, CLOSED_LOST_FREE))
            open_[key] = t
        elif key in open_:
            rows.append((open_.pop(key), t, CLOSED_FREE))
        else:
            rows.append((-1, t, FREE_WITHOUT_ALLOC))
    rows += [(t, -1, OUTSTANDING) for t in open_.values()]
    return sorted(rows)


def run(evs, cuts):
    p = Pairer()
    out = []
    bounds = [0, *sorted({c % (len(evs) + 1) for c in cuts}), len(evs)]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        if hi > lo:
            out.append(p.feed(make_events(evs[lo:hi], ts0=lo)))
    out.append(p.finish())
    rows = Columns.concat([o for o in out if len(o)]) if any(len(o) for o in out) else None
    return p, rows


def as_tuples(rows):
    if rows is None:
        return []
    c = rows.cols
    return sorted(((-1 if a == NO_TS else a), (-1 if f == NO_TS else f), k)
                  for a, f, k in zip(c["alloc_ts"].tolist(), c["free_ts"].tolist(), c["kind"].tolist(),
                                     strict=True))


@settings(max_examples=400, deadline=None)
@given(st.lists(event, max_size=60), st.lists(st.integers(0, 60), max_size=4))
def test_pairing_follows_the_rules_however_batched(evs, cuts):
    p, rows = run(evs, cuts)
    assert as_tuples(rows) == reference(evs)
    s = p.stats
    allocs = sum(e[0] for e in evs)
    assert s.allocs == allocs and s.frees == len(evs) - allocs
    # every allocation appears exactly once: outstanding + freed + lost_free = allocs
    assert s.outstanding + s.freed + s.lost_free == allocs
    # a free closes at most one allocation
    assert s.freed + s.free_without_alloc == s.frees
    if rows is not None:
        c = rows.cols
        alloc_times = c["alloc_ts"][c["alloc_ts"] != NO_TS]
        assert len(np.unique(alloc_times)) == len(alloc_times) == allocs
        # nothing outstanding has a free; every closed row was freed after it was allocated
        out = c["kind"] == OUTSTANDING
        assert (c["free_ts"][out] == NO_TS).all()
        closed = (c["kind"] == CLOSED_FREE) | (c["kind"] == CLOSED_LOST_FREE)
        assert (c["free_ts"][closed] > c["alloc_ts"][closed]).all()
        # attributes travel with their allocation: size and stack were set from the alloc event's time
        has_alloc = c["alloc_ts"] != NO_TS
        assert (c["size"][has_alloc] == c["alloc_ts"][has_alloc] + 1).all()
        assert (c["alloc_stack"][has_alloc] == c["alloc_ts"][has_alloc]).all()
        freed = c["kind"] == CLOSED_FREE
        assert (c["free_stack"][freed] == c["free_ts"][freed]).all()


def test_session_namespaces_do_not_mix():
    # same address allocated in session 1 and session 2 and in non-session pool, freed in reverse order
    evs = [(True, 1, 3), (True, 2, 3), (True, 0, 3), (False, 0, 3), (False, 2, 3), (False, 1, 3)]
    p, rows = run(evs, [])
    assert p.stats.freed == 3 and p.stats.lost_free == 0 and p.stats.free_without_alloc == 0
    got = {(a, f) for a, f, _ in as_tuples(rows)}
    assert got == {(0, 5), (1, 4), (2, 3)}


def test_attributes_and_stacks_travel_with_rows():
    evs = [(True, 0, 1), (True, 0, 2), (False, 0, 1), (True, 0, 1)]
    p, rows = run(evs, [1, 3])
    c = rows.cols
    by_alloc = {a: i for i, a in enumerate(c["alloc_ts"].tolist())}
    freed = by_alloc[0]
    assert c["free_ts"][freed] == 2 and c["alloc_stack"][freed] == 0 and c["free_stack"][freed] == 2
    assert c["size"][freed] == 1 and c["kind"][freed] == CLOSED_FREE
    assert c["kind"][by_alloc[3]] == OUTSTANDING and c["kind"][by_alloc[1]] == OUTSTANDING
    assert p.stats.outstanding_bytes == 2 + 4


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 20)), st.booleans())
def test_key_order_is_the_stable_argsort(addr, wide):
    from pooltrace.pairing import _key_order

    a = np.array(addr, dtype=np.uint64) + np.uint64(0xFFFF800000000000)
    if wide and len(a):  # a span too wide to pack the row number below it: the argsort fallback
        a[0] = np.uint64(3)
    order, sorted_ = _key_order(a)
    want = np.argsort(a, kind="stable")
    assert np.array_equal(order, want) and np.array_equal(sorted_, a[want]) and sorted_.dtype == np.uint64



@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, (1 << 64) - 1), unique=True), st.sampled_from([8, 16, 17, 32, 33, 48, 49, 64]))
def test_sorted_keys_sorts_every_width(values, width):
    """_sorted_keys (radix passes up to 48 bits, numpy's sort above) gives numpy's sort for every key width."""
    from pooltrace.pairing import _sorted_keys

    key = np.array([v >> (64 - width) for v in values], dtype=np.uint64)
    assert np.array_equal(_sorted_keys(key.copy()), np.sort(key))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=400), st.lists(st.integers(0, 300), min_size=64, max_size=400))
def test_search_sorted_is_numpys(old, new):
    """_search_sorted (a merge when the two are of similar length) gives np.searchsorted's positions."""
    from pooltrace.pairing import _search_sorted

    o = np.array(sorted(old), dtype=np.uint64) + np.uint64(0xFFFF800000000000)
    n = np.array(sorted(new), dtype=np.uint64) + np.uint64(0xFFFF800000000000)
    assert np.array_equal(_search_sorted(o, n), np.searchsorted(o, n))

@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, 40)), st.data())
def test_merged_places_two_sorted_runs_without_common_values(values, data):
    from pooltrace.pairing import _merged

    values = sorted(values)
    new_mask = data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values)))
    old = np.array([v for v, m in zip(values, new_mask, strict=True) if not m], dtype=np.uint64)
    new = np.array([v for v, m in zip(values, new_mask, strict=True) if m], dtype=np.uint64)
    at_new, is_new = _merged(old, new)
    merged = np.empty(len(values), dtype=np.uint64)
    merged[at_new] = new
    merged[~is_new] = old
    assert merged.tolist() == values and is_new.tolist() == new_mask


def reference_in_order(evs, bounds):
    """The rows of every batch and of finish() in the order the Pairer gives them (the dataset's row order):
    per namespace (ascending), allocations open before the batch closed by it (by address), then this
    batch's allocations closed in it (by address, time), then frees without an allocation (by address,
    time); at the end, the open ones by namespace (in order of first appearance) and address. A row is
    (alloc_ts, free_ts, kind, size, alloc_stack, free_stack, address, session_id)."""
    base = 0xFFFF800000000000
    open_: dict = {}
    ns_seen: list = []
    out = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        if hi <= lo:
            continue
        rows = []
        for t in range(lo, hi):
            is_alloc, ns, addr = evs[t]
            key = (ns, addr)
            sid = max(ns - 1, 0)
            if key in open_:
                ta = open_.pop(key)
                kind = CLOSED_LOST_FREE if is_alloc else CLOSED_FREE
                row = (ta, t, kind, ta + 1, ta, -1 if is_alloc else t, base + 16 * addr, sid)
                rows.append(((ns, 0 if ta < lo else 1, addr, t), row))
            elif not is_alloc:
                rows.append(((ns, 2, addr, t), (NO_TS, t, FREE_WITHOUT_ALLOC, t + 1, -1, t, base + 16 * addr, sid)))
            if is_alloc:
                open_[key] = t
        ns_seen += [ns for ns in sorted({e[1] for e in evs[lo:hi]}) if ns not in ns_seen]
        out.append([r for _, r in sorted(rows)])
    out.append([(ta, NO_TS, OUTSTANDING, ta + 1, ta, -1, base + 16 * addr, max(ns - 1, 0))
                for n in ns_seen for (ns, addr), ta in sorted(open_.items()) if ns == n])
    return out


@settings(max_examples=400, deadline=None)
@given(st.lists(event, max_size=60), st.lists(st.integers(0, 60), max_size=6), st.booleans())
def test_rows_come_in_the_documented_order(evs, cuts, compact_often):
    """Also with the attribute store of open allocations compacted after every batch."""
    from pooltrace.pairing import _Store

    saved = _Store.min_rows, _Store.ratio
    if compact_often:
        _Store.min_rows, _Store.ratio = 0, 1
    try:
        _check_documented_order(evs, cuts)
    finally:
        _Store.min_rows, _Store.ratio = saved


def _check_documented_order(evs, cuts):
    bounds = [0, *sorted({c % (len(evs) + 1) for c in cuts}), len(evs)]
    p = Pairer()
    got = [p.feed(make_events(evs[lo:hi], ts0=lo)) for lo, hi in zip(bounds, bounds[1:], strict=False) if hi > lo]
    got.append(p.finish())
    names = ("alloc_ts", "free_ts", "kind", "size", "alloc_stack", "free_stack", "address", "session_id")
    got = [list(zip(*(r.cols[k].tolist() for k in names), strict=True)) for r in got]
    assert got == reference_in_order(evs, bounds)
