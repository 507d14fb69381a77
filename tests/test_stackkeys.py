"""Stack-key resolution: the streaming, vectorized resolver against the rule stated directly
(earliest definition of the key at or after the reference), however the events are split in batches."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from pooltrace.etl.stackkeys import StackKeyResolver

events = st.lists(st.tuples(st.integers(0, 40), st.booleans(), st.integers(1, 4)), max_size=80)


def _tables(evs):
    refs = [{"ts": ts, "key": key, "seq": i} for i, (ts, is_def, key) in enumerate(evs) if not is_def]
    defs = [{"ts": ts, "key": key, "seq": i, "frames": [key, i]} for i, (ts, is_def, key) in enumerate(evs)
            if is_def]
    ref_t = pa.Table.from_pylist(refs, schema=pa.schema([("ts", pa.int64()), ("key", pa.uint64()),
                                                         ("seq", pa.int64())]))
    def_t = pa.Table.from_pylist(defs, schema=pa.schema([("ts", pa.int64()), ("key", pa.uint64()),
                                                         ("seq", pa.int64()), ("frames", pa.list_(pa.uint64()))]))
    return ref_t, def_t


@settings(max_examples=300, deadline=None)
@given(events, st.lists(st.integers(0, 40), max_size=5))
def test_resolver_matches_the_rule(evs, cuts):
    evs = sorted(evs, key=lambda e: e[0])  # a time-ordered stream
    refs, defs = _tables(evs)
    expected = {}
    for r in refs.to_pylist():
        later = [d for d in defs.to_pylist() if d["key"] == r["key"] and d["ts"] >= r["ts"]]
        if later:
            expected[r["seq"]] = min(later, key=lambda d: (d["ts"], d["seq"]))["frames"]
    res = StackKeyResolver()
    got = {}
    bounds = sorted(set(cuts)) + [None]
    lo = None
    for hi in bounds:  # split by time into batches, as the reader releases them

        def part(t, lo=lo, hi=hi):
            ts = t["ts"].to_pylist()
            keep = [i for i, v in enumerate(ts) if (lo is None or v >= lo) and (hi is None or v < hi)]
            return t.take(pa.array(keep, pa.int64()))

        out = res.feed(part(refs), part(defs))
        if out is not None:
            frames = res.definitions()
            for seq, d in zip(out["seq"].to_pylist(), out["def_id"].to_pylist(), strict=True):
                got[seq] = frames[d].as_py()
        lo = hi
    assert got == expected
    assert res.unresolved == refs.num_rows - len(expected)
    assert res.resolved == len(expected)
