"""Stack parts are matched to their event: on the same CPU by (timestamp, CPU), the first event by index with
that key (_owners); parts that reached another CPU by (timestamp, thread): the first event, by index, with that
time and that known thread, whether the events come in time order or not."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pooltrace.etl.fragments import FragmentStore
from pooltrace.stackjoin import NO_ID, PLACEHOLDER, KeyPlaceholders, StackJoiner, StackTable, _owners

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


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(1, 9), max_size=4), min_size=1, max_size=6),
       st.lists(st.tuples(st.integers(-1, 7), st.integers(-1, 7)), max_size=12), st.integers(0, 3))
def test_stack_frames_are_the_kernel_part_then_the_user_part(fragments, pairs, defined):
    """StackTable.frames against its definition: per stack, the frames of its kernel fragment then of its user
    fragment, a missing part (-1) adding none; ids 6 and 7 stand for stack-key placeholders of which the first
    `defined` definitions arrived (an unresolved one adds no frames and is counted)."""
    store = FragmentStore()
    offsets = np.cumsum([0] + [len(f) for f in fragments])
    ids = store.add(np.array([v for f in fragments for v in f], dtype=np.uint64), offsets)
    keys = KeyPlaceholders(store)
    keys.feed(None, None)
    keys._defs = {0xAB: [int(ids[i % len(ids)]) for i in range(defined)]}
    keys._ph_list = [(0xAB, 0), (0xAB, 1)]
    table = StackTable(store, keys)

    def frag(x):
        return -1 if x < 0 else (PLACEHOLDER + x - 6 if x >= 6 else int(ids[x % len(ids)]))

    table._pairs = [np.array([[frag(a), frag(b)] for a, b in pairs], dtype=np.int64).reshape(-1, 2)]
    want, unresolved = [], 0
    for a, b in pairs:
        out = []
        for x in (a, b):
            if x < 0:
                continue
            r = keys.resolve(frag(x))
            if r is None:
                unresolved += 1
                continue
            out += store.frames(r).tolist()
        want.append(out)
    got, got_unresolved = table.frames()
    assert [g.tolist() for g in got] == want and got_unresolved == unresolved
    assert all(g.dtype == np.uint64 for g in got)
