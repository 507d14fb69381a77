"""Stack fragments: equal frames get one id across batches, different frames never share one, even when
their 64-bit hashes collide; ids are dense and follow first sight."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pooltrace.etl.fragments import FragmentStore, Interner, hash_segments


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


def test_colliding_first_hash_keeps_fragments_apart():
    store = FragmentStore()
    values, offsets = _segments([[10], [20], [30]])
    h1 = np.array([5, 5, 2**63 + 1], dtype=np.uint64)  # same first hash, different second hash
    h2 = np.array([1, 2, 3], dtype=np.uint64)
    ids = store.add_hashed(h1, h2, values, offsets)
    assert len(set(ids.tolist())) == 3
    again = store.add_hashed(h1[[1, 0]], h2[[1, 0]], *_segments([[20], [10]]))
    assert again.tolist() == [ids[1], ids[0]]
    later = store.add_hashed(np.array([5], np.uint64), np.array([9], np.uint64), *_segments([[40]]))
    assert later[0] not in ids.tolist() and store.frames(int(later[0])).tolist() == [40]


def test_hash_is_order_sensitive_and_handles_empty_segments():
    values, offsets = _segments([[1, 2], [2, 1]])
    h1, h2 = hash_segments(values, offsets)
    assert h1[0] != h1[1] and h2[0] != h2[1]
    e1, _ = hash_segments(np.array([7], np.uint64), np.array([0, 1, 1], np.int64))
    assert len(e1) == 2 and e1[0] != e1[1]


def test_interner_numbers_new_keys_from_first_id():
    it = Interner()
    ids, new = it.ids(np.array([-5, 3, 9], dtype=np.int64), 0)
    assert ids.tolist() == [0, 1, 2] and new.all()
    ids, new = it.ids(np.array([-7, 3, 10], dtype=np.int64), 10)
    assert ids.tolist() == [10, 1, 11] and new.tolist() == [True, False, True]
