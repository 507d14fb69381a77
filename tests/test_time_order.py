"""The reader's and the joiner's shortcuts give the same order as the plain sorts they replace."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pooltrace.etl.columns import Columns
from pooltrace.etl.reader import _time_order

rows = st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 3)), max_size=40)


@settings(max_examples=400, deadline=None)
@given(rows, rows, st.sampled_from(["read", "reversed", "shuffled"]), st.booleans(), st.randoms())
def test_time_order_is_the_three_key_sort(left, r, seq_order, huge_ts, rnd):
    """Rows left from the last release (sorted) then a chunk's rows: in read order as usual, or in an
    order for which the fast path does not hold."""
    n_left = len(left)
    left_t = Columns({"ts": np.array([a for a, _ in left], dtype=np.int64),
                      "cpu": np.array([c for _, c in left], dtype=np.uint16), "seq": np.arange(n_left, dtype=np.int64)})
    left_t = left_t.take(np.lexsort((left_t.cols["seq"], left_t.cols["cpu"], left_t.cols["ts"])))
    seq = np.arange(n_left, n_left + len(r), dtype=np.int64)
    if seq_order == "reversed":
        seq = seq[::-1].copy()
    elif seq_order == "shuffled":
        rnd.shuffle(seq)
    t = Columns.concat([left_t, Columns({"ts": np.array([a for a, _ in r], dtype=np.int64),
                                         "cpu": np.array([c for _, c in r], dtype=np.uint16), "seq": seq})])
    if huge_ts and len(t):  # a range too wide for the combined key: the three-key sort is used
        t.cols["ts"][0] = np.iinfo(np.int64).max
    want = np.lexsort((t.cols["seq"], t.cols["cpu"], t.cols["ts"]))
    got = _time_order(t)
    got = np.arange(len(t)) if got is None else got
    assert np.array_equal(got, want)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1_000, 3_579_545, 10_000_000, 14_318_180, 1_000_000_000, 2_500_000_000, 25_000_000]),
       st.lists(st.integers(-(1 << 62), 1 << 62), max_size=20), st.integers(0, 1 << 60))
def test_ticks_to_ns_shortcut_is_the_division(freq, ticks, start):
    """Frequencies that divide 1e9 (10 MHz: 100 ns per tick) multiply instead of dividing: the same values,
    wrap-around included, as the exact division formula."""
    import dataclasses

    from pooltrace.etl.reader import EtlReader
    from tests.conftest import ROOT

    with EtlReader(ROOT / "traces" / "sample-leak.etl") as r:
        h = dataclasses.replace(r.header, clock_type=1, perf_freq=freq, start_ticks=start)
    t = np.array(ticks, dtype=np.int64)
    with np.errstate(over="ignore"):
        q, rem = np.divmod(t - np.int64(start), np.int64(freq))
        want = q * np.int64(1_000_000_000) + (rem * np.int64(1_000_000_000)) // np.int64(freq)
    assert np.array_equal(h.ticks_to_ns(t), want)
