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
