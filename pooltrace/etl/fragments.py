"""Stack fragments by content: 128-bit hashes of frame sequences, vectorized interning of keys, and the
store of distinct fragments.

A fragment (the frames of one StackWalk event or stack-key definition) is identified by two independent
64-bit hashes of its frames; ids are numbered in order of first sight (within one batch, in key order).
Lookups are binary searches in sorted arrays, so no Python code runs per stack event.
"""

from __future__ import annotations

import numpy as np

M1, M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
SEEDS = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xD1B54A32D192ED03))


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x *= M1
    x ^= x >> np.uint64(27)
    x *= M2
    return x ^ (x >> np.uint64(31))


def hash_segments(values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes of every segment values[offsets[i]:offsets[i+1]] (order-sensitive)."""
    counts = np.diff(offsets)
    if not len(counts):
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    pos = (np.arange(len(values), dtype=np.int64) - np.repeat(offsets[:-1], counts)).astype(np.uint64)
    v = values.astype(np.uint64, copy=False)
    starts = offsets[:-1]
    nonempty = counts > 0
    h = []
    for seed in SEEDS:
        x = _mix(v ^ (pos * seed + seed))
        if len(x):
            s = np.add.reduceat(x, np.minimum(starts, len(x) - 1))
            s = np.where(nonempty, s, np.uint64(0))
        else:
            s = np.zeros(len(counts), np.uint64)
        h.append(_mix(s ^ (counts.astype(np.uint64) * seed)))
    return h[0], h[1]


class Interner:
    """Ids of int64 keys, numbered from 0 in order of first sight; known keys in one sorted array."""

    def __init__(self) -> None:
        self._keys = np.zeros(0, dtype=np.int64)
        self._ids = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._keys)

    def ids(self, keys: np.ndarray, first_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids of distinct, ascending `keys`, and the mask of those new now (numbered from first_id in key
        order)."""
        pos = np.searchsorted(self._keys, keys)
        found = np.zeros(len(keys), dtype=bool)
        inside = pos < len(self._keys)
        found[inside] = self._keys[pos[inside]] == keys[inside]
        out = np.empty(len(keys), dtype=np.int64)
        out[found] = self._ids[pos[found]]
        new = ~found
        n_new = int(new.sum())
        if n_new:
            out[new] = np.arange(first_id, first_id + n_new, dtype=np.int64)
            self._keys = np.insert(self._keys, pos[new], keys[new])
            self._ids = np.insert(self._ids, pos[new], out[new])
        return out, new


class FragmentStore:
    """Distinct frame sequences (stack fragments), by id."""

    def __init__(self) -> None:
        self._by_h1 = Interner()  # first hash -> id
        self._h2: list[np.ndarray] = []  # second hash of every id, in blocks
        self._h2_all = np.zeros(0, dtype=np.uint64)
        self._rare: dict[tuple[int, int], int] = {}  # (h1, h2) of fragments whose first hash collided
        self._frames: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._frames)

    def add(self, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Ids of the segments, creating new ones for frame sequences not seen before."""
        h1, h2 = hash_segments(values, offsets)
        return self.add_hashed(h1, h2, values, offsets)

    def add_hashed(self, h1: np.ndarray, h2: np.ndarray, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """As add(), for segments whose hashes are known (computed by hash_segments)."""
        u1, first, inverse = np.unique(h1.view(np.int64), return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        u2 = h2[first]
        if not (h2 == u2[inverse]).all():  # a 64-bit collision between different stacks in this batch
            return self._add_slow(h1, h2, values, offsets)
        ids, new = self._by_h1.ids(u1, len(self._frames))
        n_new = np.flatnonzero(new)
        if len(n_new):
            for j in first[n_new].tolist():
                self._frames.append(values[offsets[j]:offsets[j + 1]].copy())
            self._h2.append(u2[n_new])
        if len(n_new) < len(new):  # known first hash: the second must agree, else it is another fragment
            old = np.flatnonzero(~new)
            self._flush_h2()
            differ = old[self._h2_all[ids[old]] != u2[old]]
            for k in differ.tolist():
                ids[k] = self._rare_id(int(u1[k]), int(u2[k]), values, offsets, int(first[k]))  # h1 as int64
        return ids[inverse]

    def _flush_h2(self) -> None:
        if self._h2:
            self._h2_all = np.concatenate([self._h2_all, *self._h2])
            self._h2 = []

    def _rare_id(self, a: int, b: int, values: np.ndarray, offsets: np.ndarray, j: int) -> int:
        i = self._rare.get((a, b))
        if i is None:
            self._flush_h2()
            i = self._rare[(a, b)] = len(self._frames)
            self._frames.append(values[offsets[j]:offsets[j + 1]].copy())
            self._h2_all = np.append(self._h2_all, np.uint64(b))  # keeps ids aligned; never matched by h1
        return i

    def _add_slow(self, h1, h2, values, offsets) -> np.ndarray:
        out = np.empty(len(h1), dtype=np.int64)
        self._flush_h2()
        for k, (a, b) in enumerate(zip(h1.view(np.int64).tolist(), h2.tolist(), strict=True)):
            i, new = self._by_h1.ids(np.array([a], dtype=np.int64), len(self._frames))
            if new[0]:
                self._frames.append(values[offsets[k]:offsets[k + 1]].copy())
                self._h2_all = np.append(self._h2_all, np.uint64(b))
                out[k] = i[0]
            elif self._h2_all[i[0]] == b:
                out[k] = i[0]
            else:
                out[k] = self._rare_id(a, b, values, offsets, k)
        return out

    def frames(self, frag: int) -> np.ndarray:
        return self._frames[frag]
