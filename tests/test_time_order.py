"""The reader's and the joiner's shortcuts give the same order as the plain sorts they replace."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pooltrace.etl.columns import Columns
from pooltrace.etl.reader import _time_order

rows = st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 3)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(rows, st.booleans(), st.booleans(), st.booleans())
def test_time_order_is_the_three_key_sort(r, shuffled_seq, subset, huge_ts):
    n = len(r)
    ts = np.array([a for a, _ in r], dtype=np.int64)
    if huge_ts and n:  # a range too wide for the combined key: the three-key sort is used
        ts[0] = np.iinfo(np.int64).max
    seq = np.arange(n, dtype=np.int64)
    if shuffled_seq:  # rows not in read order: the three-key sort is used
        seq = seq[::-1].copy()
    t = Columns({"ts": ts, "cpu": np.array([c for _, c in r], dtype=np.uint16), "seq": seq})
    idx = np.arange(0, n, 2) if subset else None
    sub = t if idx is None else t.take(idx)
    want = np.lexsort((sub.cols["seq"], sub.cols["cpu"], sub.cols["ts"]))
    want = want if idx is None else idx[want]
    got = _time_order(t, idx)
    got = (np.arange(n) if idx is None else idx) if got is None else got
    assert np.array_equal(got, want)
