"""Stack parts are matched to their event: on the same CPU by (timestamp, CPU), the first event by index with
that key (_owners); parts that reached another CPU by (timestamp, thread): the first event, by index, with that
time and that known thread, whether the events come in time order or not."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pooltrace.stackjoin import NO_ID, StackJoiner, _owners

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


# events: (key, seq) with few keys (collisions are the point); parts: (key, seq), most of them read right
# after an event (its seq + 1: what the seq table answers) with that event's key or another, the rest anywhere
owner_events = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 40)), min_size=1, max_size=30,
                        unique_by=lambda e: e[1])


@st.composite
def owner_parts(draw, evs):
    out = []
    for _ in range(draw(st.integers(0, 30))):
        if draw(st.booleans()):
            k, s = draw(st.sampled_from(evs))
            out.append((draw(st.sampled_from([k, k, draw(st.integers(0, 5))])), s + 1))
        else:
            out.append((draw(st.integers(0, 5)), draw(st.integers(-3, 45))))
    return out


@settings(max_examples=300, deadline=None)
@given(st.data(), owner_events, st.booleans(), st.sampled_from([1, 1000]))
def test_a_part_goes_to_the_first_event_of_its_cpu_and_time(data, evs, in_key_order, stride):
    if in_key_order:
        evs = sorted(evs, key=lambda e: e[0])
    prts = data.draw(owner_parts(evs))
    # stride 1000: seq numbers too sparse for the seq table, every part is searched
    ekey = np.array([k for k, _ in evs], dtype=np.int64)
    eseq = np.array([s for _, s in evs], dtype=np.int64) * stride
    pkey = np.array([k for k, _ in prts], dtype=np.int64)
    pseq = np.array([s for _, s in prts], dtype=np.int64) * stride
    got = _owners(ekey, eseq, pkey, pseq)
    want = [next((i for i, (k, _) in enumerate(evs) if k == pk), -1) for pk, _ in prts]
    assert got.tolist() == want
