"""Stack parts that reached another CPU are matched to their event by (timestamp, thread): the first event,
by index, with that time and that known thread, whether the events come in time order or not."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pooltrace.stackjoin import NO_ID, StackJoiner

events = st.lists(st.tuples(st.integers(0, 5), st.sampled_from([1, 2, 3, NO_ID])), max_size=30)
parts = st.lists(st.tuples(st.integers(0, 6), st.sampled_from([1, 2, 3, 4])), max_size=15)


@settings(max_examples=200, deadline=None)
@given(events, parts, st.booleans())
def test_a_part_goes_to_the_first_event_of_its_time_and_thread(evs, prts, in_time_order):
    if in_time_order:
        evs = sorted(evs, key=lambda e: e[0])
    ts = np.array([t for t, _ in evs], dtype=np.int64)
    tid = np.array([h for _, h in evs], dtype=np.uint32)
    p_ts = np.array([t for t, _ in prts], dtype=np.int64)
    p_tid = np.array([h for _, h in prts], dtype=np.uint32)
    got = StackJoiner._by_thread(ts, tid, p_ts, p_tid)
    if not any(h != NO_ID for _, h in evs):
        assert got is None
        return
    want = [next((i for i, (t, h) in enumerate(evs) if t == pt and h == ph and h != NO_ID), -1) for pt, ph in prts]
    assert got.tolist() == want
