"""Stack fragments: equal frames get one id across batches, different frames never share one, even when
their 64-bit hashes collide; ids are dense and follow first sight."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pooltrace.etl.fragments import Digest, FragmentStore, Interner, digest, hash_segments


def _segments(stacks: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(stacks) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in stacks], out=offsets[1:])
    values = np.array([f for s in stacks for f in s], dtype=np.uint64)
    return values, offsets


frames = st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([[1], [1, 2], [2, 1], [2**63 + 5, 7], [3] * 4, [2**64 - 1]]) | frames,
                         max_size=12), min_size=1, max_size=5))
def test_same_frames_same_id_across_batches(batches):
    store = FragmentStore()
    seen: dict[tuple, int] = {}
    for stacks in batches:
        if not stacks:
            continue
        ids = store.add(*_segments(stacks))
        for s, i in zip(stacks, ids.tolist(), strict=True):
            assert seen.setdefault(tuple(s), i) == i
            assert store.frames(i).tolist() == s
    assert sorted(set(seen.values())) == list(range(len(store)))


def _digest(h1: list[int], h2: list[int], stacks: list[list[int]]) -> Digest:
    values, offsets = _segments(stacks)
    return Digest(np.array(h1, np.int64), np.array(h2, np.uint64), offsets, values, np.arange(len(h1)))


def test_colliding_first_hash_keeps_fragments_apart():
    store = FragmentStore()
    ids = store.add_digest(_digest([-9, 5, 5], [3, 1, 2], [[30], [10], [20]]))  # 5: same first hash, not frames
    assert sorted(ids.tolist()) == [0, 1, 2]
    again = store.add_digest(_digest([5, 5], [1, 2], [[10], [20]]))
    assert again.tolist() == [ids[1], ids[2]]
    later = store.add_digest(_digest([5], [9], [[40]]))
    assert later[0] not in ids.tolist() and store.frames(int(later[0])).tolist() == [40]
    assert [store.frames(int(i)).tolist() for i in ids] == [[30], [10], [20]]


def test_digest_keeps_distinct_fragments_and_maps_every_segment():
    values, offsets = _segments([[1, 2], [3], [1, 2], [3], [4, 5, 6]])
    d = digest(values, offsets)
    assert len(d.h1) == 3 and (d.h1[1:] > d.h1[:-1]).all()
    got = [d.values[d.offsets[k]:d.offsets[k + 1]].tolist() for k in d.inverse]
    assert got == [[1, 2], [3], [1, 2], [3], [4, 5, 6]]


def test_hash_is_order_sensitive_and_handles_empty_segments():
    values, offsets = _segments([[1, 2], [2, 1]])
    h1, h2 = hash_segments(values, offsets)
    assert h1[0] != h1[1] and h2[0] != h2[1]
    e1, _ = hash_segments(np.array([7], np.uint64), np.array([0, 1, 1], np.int64))
    assert len(e1) == 2 and e1[0] != e1[1]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2**64 - 1), max_size=6), min_size=1, max_size=8), st.integers(0, 3))
def test_a_segment_hashes_alike_wherever_it_stands(segments, empty_after):
    """A segment's hashes depend on its frames only: not on the segments before it nor on empty segments
    after it (the last segments of a chunk can be empty; a sum clipped at the array's end once dropped the
    frames of the segment before them)."""
    alone = [hash_segments(*_segments([seg])) for seg in segments]
    values, offsets = _segments(segments + [[]] * empty_after)
    together = hash_segments(values, offsets)
    for i, (h1, h2) in enumerate(alone):
        assert together[0][i] == h1[0] and together[1][i] == h2[0], i


def test_interner_numbers_new_keys_from_first_id():
    it = Interner()
    ids, new = it.ids(np.array([-5, 3, 9], dtype=np.int64), 0)
    assert ids.tolist() == [0, 1, 2] and new.all()
    ids, new = it.ids(np.array([-7, 3, 10], dtype=np.int64), 10)
    assert ids.tolist() == [10, 1, 11] and new.tolist() == [True, False, True]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-5, 30), unique=True), st.lists(st.integers(-10, 40)))
def test_interner_lookup_gives_known_ids_and_marks_the_unknown(known, keys):
    it = Interner()
    k = np.sort(np.array(known, dtype=np.int64))
    ids, _ = it.ids(k, 0)
    by_key = dict(zip(k.tolist(), ids.tolist(), strict=True))
    got, found = it.lookup(np.array(keys, dtype=np.int64))
    assert found.tolist() == [x in by_key for x in keys]
    assert got.tolist() == [by_key.get(x, -1) for x in keys]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=60), st.data())
def test_digest_of_spans_in_place_equals_digest_of_the_copied_frames(words, data):
    from pooltrace.etl.fragments import digest_spans, hash_spans

    w = np.array(words, dtype=np.uint64)
    spans = data.draw(st.lists(st.tuples(st.integers(0, len(w) - 1), st.integers(1, 8)), max_size=20))
    spans = [(s, min(c, len(w) - s)) for s, c in spans]
    starts = np.array([s for s, _ in spans], dtype=np.int64)
    counts = np.array([c for _, c in spans], dtype=np.int64)
    values = np.concatenate([w[s:s + c] for s, c in spans]) if spans else np.zeros(0, np.uint64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    for a, b in zip(hash_segments(values, offsets), hash_spans(w, starts, counts), strict=True):
        assert np.array_equal(a, b)
    if spans:
        d1, d2 = digest(values, offsets), digest_spans(w, starts, counts)
        for k in ("h1", "h2", "offsets", "values", "inverse"):
            assert np.array_equal(getattr(d1, k), getattr(d2, k)), k


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.data())
def test_digest_groups_segments_exactly_by_their_frames(words, data):
    """Few distinct words, so equal segments are common; empty, one-frame (kept inside Arrow's view) and
    longer segments, overlapping or not: every segment maps to a distinct fragment holding exactly its
    frames, and no two distinct fragments hold the same frames."""
    from pooltrace.etl.fragments import digest_spans

    w = np.array(words, dtype=np.uint64)
    spans = data.draw(st.lists(st.tuples(st.integers(0, len(w)), st.integers(0, 4)), min_size=1, max_size=30))
    spans = [(s, min(c, len(w) - s)) for s, c in spans]
    d = digest_spans(w, np.array([s for s, _ in spans], np.int64), np.array([c for _, c in spans], np.int64))
    distinct = [tuple(d.values[d.offsets[k]:d.offsets[k + 1]].tolist()) for k in range(len(d.h1))]
    assert len(set(distinct)) == len(distinct)
    assert [distinct[k] for k in d.inverse.tolist()] == [tuple(w[s:s + c].tolist()) for s, c in spans]
    assert (d.h1[1:] >= d.h1[:-1]).all()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 5)), max_size=12))
def test_span_positions_are_the_spans_concatenated(spans):
    from pooltrace.etl.columns import span_positions

    starts = np.array([s for s, _ in spans], dtype=np.int64)
    counts = np.array([c for _, c in spans], dtype=np.int64)
    assert span_positions(starts, counts).tolist() == [s + i for s, c in spans for i in range(c)]
