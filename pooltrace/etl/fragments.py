"""Stack fragments by content: 128-bit hashes of frame sequences, vectorized interning of keys, and the
store of distinct fragments.

A fragment (the frames of one StackWalk event or stack-key definition) is identified by two independent
64-bit hashes of its frames; ids are numbered in order of first sight (within one batch, in key order).
Within a chunk the distinct fragments are found by their bytes (Arrow's hash table), so only those are
hashed; lookups are binary searches in sorted arrays, so no Python code runs per stack event.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

try:  # pyarrow.compute's call_function where it is defined: importing pyarrow.compute itself costs 0.04-0.1 s
    from pyarrow._compute import call_function  # (it makes a wrapper for every function), in every decode worker
except ImportError:  # pragma: no cover - a pyarrow laid out otherwise
    from pyarrow.compute import call_function

from pooltrace.etl.columns import span_positions

M1, M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
# per hash: (element multiplier, position base K) — odd numbers, so every step is invertible mod 2**64
PARAMS = ((np.uint64(0xFF51AFD7ED558CCD), 0x9E3779B97F4A7C15), (np.uint64(0xC4CEB9FE1A85EC53), 0xD1B54A32D192ED03))


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x *= M1
    x ^= x >> np.uint64(27)
    x *= M2
    return x ^ (x >> np.uint64(31))


class _Powers:
    """K**i and K**-i mod 2**64 for i < n, grown on demand (one table per hash, shared by all calls)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.up = np.ones(1, dtype=np.uint64)
        self.down = np.ones(1, dtype=np.uint64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.up) < n:
            size = max(n, 2 * len(self.up))
            self.up = _power_table(self.k, size)
            self.down = _power_table(pow(self.k, -1, 1 << 64), size)
        return self.up, self.down


def _power_table(k: int, n: int) -> np.ndarray:
    t = np.full(n, np.uint64(k), dtype=np.uint64)
    t[0] = 1
    return np.cumprod(t, dtype=np.uint64)  # wraps modulo 2**64, as intended


_POWERS = [_Powers(k) for _m, k in PARAMS]


def hash_segments(values: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two independent 64-bit hashes of every segment values[offsets[i]:offsets[i+1]] (order-sensitive).

    Each is a polynomial hash mod 2**64 of mixed frames, sum of mix(v[j]) * K**(j - start), then mixed with
    the segment's length: hash_spans over the segments as they lie in `values` (an empty one sums to 0)."""
    return hash_spans(values.astype(np.uint64, copy=False), offsets[:-1], np.diff(offsets))


class Interner:
    """Ids of int64 keys, numbered from 0 in order of first sight; known keys in one sorted array."""

    def __init__(self) -> None:
        self._keys = np.zeros(0, dtype=np.int64)
        self._ids = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._keys)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ids of any `keys` (in any order, repeated or not) and the mask of those known; unknown get -1."""
        out = np.full(len(keys), -1, dtype=np.int64)
        if not len(self._keys):
            return out, np.zeros(len(keys), dtype=bool)
        pos = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        found = self._keys[pos] == keys
        out[found] = self._ids[pos[found]]
        return out, found

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


@dataclass
class Digest:
    """The distinct fragments of a batch of segments: their hashes (ascending first hash, as int64), their
    frames, and for every segment the index of its distinct fragment. Computed where the frames are
    decoded (a worker process too); FragmentStore.add_digest numbers them."""

    h1: np.ndarray  # int64 view of the first hash
    h2: np.ndarray  # uint64
    offsets: np.ndarray
    values: np.ndarray
    inverse: np.ndarray | None  # None once it has become the stacks table's `frag` column


def hash_spans(words: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """hash_segments of the segments words[starts[i]:starts[i] + counts[i]] (uint64 words) without copying
    them out: the sums are differences of a running sum of K**p-weighted words over the span the segments
    cover (p: position in `words`), brought back to segment-relative powers with K**-start."""
    if not len(counts):
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    lo, hi = int(starts.min()), int((starts + counts).max())
    w = words[lo:hi]
    rel = starts - lo
    h = []
    for (mult, k), powers in zip(PARAMS, _POWERS, strict=True):
        up, down = powers.get(len(w) + 1)
        x = w * mult
        x ^= x >> np.uint64(29)
        x *= up[:len(w)]
        run = np.zeros(len(w) + 1, dtype=np.uint64)
        np.cumsum(x, out=run[1:])
        s = (run[rel + counts] - run[rel]) * down[rel]
        h.append(_mix(s ^ (counts.astype(np.uint64) * np.uint64(k))))
    return h[0], h[1]


def digest_spans(words: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> Digest:
    """digest() of the segments words[starts[i]:starts[i] + counts[i]] (uint64 words), read where they lie:
    Arrow's hash table finds the distinct segments by their bytes, through binary views of them (no copy)."""
    if len(words) * 8 >= 1 << 31:  # a view's offset is 32-bit: copy the frames out (never met: chunks are MBs)
        pos = span_positions(starts, counts)
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return digest(words[pos], offsets)
    return _distinct(_binary_views(words, starts, counts), words, starts, counts)


def digest(values: np.ndarray, offsets: np.ndarray) -> Digest:
    """The distinct segments values[offsets[i]:offsets[i+1]] (uint64 frames) and the index of each one's."""
    values = values.astype(np.uint64, copy=False)
    arr = pa.Array.from_buffers(pa.large_binary(), len(offsets) - 1,
                                [None, pa.py_buffer(offsets.astype(np.int64) * 8), pa.py_buffer(values)])
    return _distinct(arr, values, offsets[:-1], np.diff(offsets))


def _binary_views(words: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> pa.Array:
    """A binary_view array whose value i is the bytes of words[starts[i]:starts[i] + counts[i]], over the
    words' own buffer. Arrow's view layout (16 bytes): int32 length, then up to 12 bytes inline, or a 4-byte
    prefix, int32 buffer index and int32 byte offset; one frame (8 bytes) is inline."""
    view = np.zeros((len(starts), 4), dtype=np.uint32)
    view[:, 0] = counts * 8
    w32 = words.view(np.uint32)
    at = starts * 2  # in 32-bit words
    view[:, 1] = np.where(counts > 0, w32[np.minimum(at, len(w32) - 1)], 0)  # inline first half, or prefix
    one = counts == 1
    view[one, 2] = w32[at[one] + 1]
    many = counts > 1
    view[many, 3] = starts[many] * 8  # buffer 0
    return pa.Array.from_buffers(pa.binary_view(), len(starts), [None, pa.py_buffer(view), pa.py_buffer(words)])


def _distinct(arr: pa.Array, source: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> Digest:
    """The Digest of segments source[starts[i]:starts[i] + counts[i]], given as the Arrow binary array
    `arr` of their bytes. Arrow's dictionary_encode finds the distinct ones exactly (equal bytes), numbered
    in order of first sight; only those are hashed, and they are put in ascending (first hash, second
    hash) order, as FragmentStore.add_digest expects."""
    if not len(arr):
        z = np.zeros(0, np.uint64)
        return Digest(z.view(np.int64), z, np.zeros(1, np.int64), z, np.zeros(0, np.int64))
    idx = call_function("dictionary_encode", [arr]).indices.to_numpy().astype(np.int64)
    new = np.ones(len(idx), dtype=bool)  # ids come in order of first sight: a new one exceeds all before it
    new[1:] = idx[1:] > np.maximum.accumulate(idx)[:-1]
    first = np.flatnonzero(new)
    n = counts[first]
    pos = span_positions(starts[first], n)
    values = source[pos].astype(np.uint64, copy=False)
    offsets = np.zeros(len(first) + 1, dtype=np.int64)
    np.cumsum(n, out=offsets[1:])
    h1, h2 = hash_segments(values, offsets)
    k1 = h1.view(np.int64)
    order = np.lexsort((h2.view(np.int64), k1))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    n = n[order]
    sorted_offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(n, out=sorted_offsets[1:])
    pos = span_positions(offsets[:-1][order], n)
    return Digest(k1[order], h2[order], sorted_offsets, values[pos], rank[idx])


class FragmentStore:
    """Distinct frame sequences (stack fragments), by id."""

    def __init__(self) -> None:
        self._by_h1 = Interner()  # first hash (int64) -> id
        self._h2: list[np.ndarray] = []  # second hash of new ids, in blocks not yet joined to _h2_all
        self._h2_all = np.zeros(0, dtype=np.uint64)  # second hash by id
        self._rare: dict[tuple[int, int], int] = {}  # (h1, h2) of fragments whose first hash collided
        self._frames: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._frames)

    def add(self, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Ids of the segments, creating new ones for frame sequences not seen before."""
        d = digest(values, offsets)
        return self.add_digest(d)[d.inverse]

    def add_digest(self, d: Digest) -> np.ndarray:
        """Ids of the digest's distinct fragments (new ones numbered in ascending first hash)."""
        n = len(d.h1)
        dup = np.zeros(n, dtype=bool)
        dup[1:] = d.h1[1:] == d.h1[:-1]  # same first hash as the fragment before it: a collision
        head = np.flatnonzero(~dup)
        ids = np.empty(n, dtype=np.int64)
        hid, new = self._by_h1.ids(d.h1[head], len(self._frames))
        ids[head] = hid
        fresh = head[new]
        for j in fresh.tolist():
            self._frames.append(d.values[d.offsets[j]:d.offsets[j + 1]].copy())
        if len(fresh):
            self._h2.append(d.h2[fresh])
        known = head[~new]
        if len(known) or dup.any():
            self._flush_h2()
            differ = known[self._h2_all[ids[known]] != d.h2[known]]
            for j in np.concatenate([differ, np.flatnonzero(dup)]).tolist():
                ids[j] = self._rare_id(int(d.h1[j]), int(d.h2[j]), d.values[d.offsets[j]:d.offsets[j + 1]])
        return ids

    def _flush_h2(self) -> None:
        if self._h2:
            self._h2_all = np.concatenate([self._h2_all, *self._h2])
            self._h2 = []

    def _rare_id(self, a: int, b: int, frames: np.ndarray) -> int:
        i = self._rare.get((a, b))
        if i is None:
            i = self._rare[(a, b)] = len(self._frames)
            self._frames.append(frames.copy())
            self._h2_all = np.append(self._h2_all, np.uint64(b))  # keeps ids aligned; never matched by h1
        return i

    def frames(self, frag: int) -> np.ndarray:
        return self._frames[frag]

    def flat(self) -> tuple[np.ndarray, np.ndarray]:
        """The frames of every fragment concatenated (uint64) and where each one's start (offsets, one more
        than fragments): fragment i is values[offsets[i]:offsets[i + 1]]."""
        offsets = np.zeros(len(self._frames) + 1, dtype=np.int64)
        np.cumsum(np.array([len(f) for f in self._frames], dtype=np.int64), out=offsets[1:])
        values = np.concatenate(self._frames) if self._frames else np.zeros(0, dtype=np.uint64)
        return values.astype(np.uint64, copy=False), offsets
