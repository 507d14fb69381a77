"""Pairing engine: match every pool allocation with its free, batch by batch, vectorized.

Rules (the contract the reports rely on):
- Events are processed in time order. The key is the address, within one namespace per pool kind:
  non-session pool, and one per session id (session pool is keyed by (session_id, address)).
- A free closes the allocation open at its key. A free with no open allocation is an allocation made
  before the trace: it becomes a row with no alloc time (`free_without_alloc`), never outstanding.
- An allocation at a key that is still open means the earlier block's free was lost: the earlier one is
  closed at the new allocation's time and counted as `lost_free`; it is never outstanding.
- What is open at the end is outstanding.

Within a batch the events are sorted by (key, time) and every event looks at its predecessor on the
same key, so no Python code runs per event. Open allocations live in key-sorted arrays (memory grows
with what is outstanding, not with the number of events).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pooltrace.etl.columns import Columns

# Row attributes carried from the allocation event / the free event.
ALLOC_FIELDS = ("alloc_ts", "tag", "pool_type", "size", "address", "session_id", "cpu", "pid", "tid", "alloc_stack")
FREE_FIELDS = ("free_ts", "free_stack", "free_cpu")
NO_STACK = -1
NO_TS = np.iinfo(np.int64).min

CLOSED_FREE, CLOSED_LOST_FREE, FREE_WITHOUT_ALLOC, OUTSTANDING = 0, 1, 2, 3


@dataclass
class PairStats:
    allocs: int = 0
    frees: int = 0
    freed: int = 0  # allocations closed by their free
    lost_free: int = 0
    free_without_alloc: int = 0
    outstanding: int = 0  # set by finish()
    outstanding_bytes: int = 0


@dataclass
class PoolEvents:
    """Pool events of one batch, in time order. `alloc` marks allocations; `namespace` is 0 for
    non-session pool and session_id + 1 for session pool."""

    ts: np.ndarray
    alloc: np.ndarray
    namespace: np.ndarray
    address: np.ndarray
    tag: np.ndarray
    pool_type: np.ndarray
    size: np.ndarray
    session_id: np.ndarray
    cpu: np.ndarray
    pid: np.ndarray
    tid: np.ndarray
    stack: np.ndarray  # stack reference of the event, NO_STACK when none

    def __len__(self) -> int:
        return len(self.ts)


def _empty_rows() -> Columns:
    cols = {f: np.zeros(0, dtype=np.int64) for f in ALLOC_FIELDS + FREE_FIELDS}
    cols["kind"] = np.zeros(0, dtype=np.int8)
    return Columns(cols)


@dataclass
class _Open:
    """Open allocations of one namespace, sorted by address, and where their attributes are in the store."""

    address: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    row: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # row in the _Store


class _Store:
    """The allocation attributes (ALLOC_FIELDS) of open allocations, appended as they open and found by row
    number, so that a batch moves the open set's addresses and row numbers only, not every attribute.
    Rows of closed allocations are dropped when the store holds `ratio` times the open ones (compact)."""

    min_rows = 1 << 16  # never compacted below this size
    ratio = 4

    def __init__(self) -> None:
        self.cols: dict[str, np.ndarray] = {}
        self.n = 0

    def append(self, ev: PoolEvents, events: np.ndarray) -> np.ndarray:
        """Store the attributes of `events` (indices into ev); returns their row numbers."""
        k = len(events)
        if not k:
            return np.zeros(0, dtype=np.int64)
        if self.n + k > self.capacity:
            grown = max(2 * self.capacity, self.n + k, 1 << 12)
            for name, field_ in _FROM_ALLOC.items():
                old = self.cols.get(name)
                col = np.empty(grown, dtype=getattr(ev, field_).dtype)
                if old is not None:
                    col[:self.n] = old[:self.n]
                self.cols[name] = col
        for name, field_ in _FROM_ALLOC.items():
            self.cols[name][self.n:self.n + k] = getattr(ev, field_)[events]
        self.n += k
        return np.arange(self.n - k, self.n, dtype=np.int64)

    @property
    def capacity(self) -> int:
        return len(self.cols["alloc_ts"]) if self.cols else 0

    def compact(self, opens: list[_Open]) -> None:
        """Keep only the rows of `opens` (renumbered in place)."""
        live = sum(len(o.row) for o in opens)
        if self.n < self.min_rows or self.n < self.ratio * live:
            return
        rows = np.concatenate([o.row for o in opens]) if opens else np.zeros(0, dtype=np.int64)
        self.cols = {name: np.concatenate([col[rows], np.empty(live, dtype=col.dtype)])
                     for name, col in self.cols.items()}
        self.n = live
        at = 0
        for o in opens:
            o.row = np.arange(at, at + len(o.row), dtype=np.int64)
            at += len(o.row)


def _key_order(addr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stable sort order of `addr` (uint64) and the sorted addresses. Usually one sort of the values
    with the row number packed below the address (the addresses of a batch span far less than 64 bits),
    several times cheaper than a stable argsort; the argsort is the fallback."""
    n = len(addr)
    bits = max(n - 1, 1).bit_length()
    lo = addr.min() if n else np.uint64(0)
    if n and int(addr.max() - lo) >> (64 - bits) == 0:
        key = _sorted_keys(((addr - lo) << np.uint64(bits)) | np.arange(n, dtype=np.uint64))
        return (key & np.uint64((1 << bits) - 1)).astype(np.int64), (key >> np.uint64(bits)) + lo
    order = np.argsort(addr, kind="stable")
    return order, addr[order]


def _sorted_keys(key: np.ndarray) -> np.ndarray:
    """The uint64 values of `key` sorted. Up to 48 bits wide (a batch's addresses usually span a few tens
    of bits): a least-significant-digit radix sort, one stable argsort of each 16-bit digit (numpy's radix
    sort for 16-bit values), about a third faster than numpy's comparison sort of 64-bit values."""
    width = int(key.max()).bit_length() if len(key) else 0
    if width > 48:
        key.sort()
        return key
    for shift in range(0, width, 16):
        key = np.take(key, np.argsort((key >> np.uint64(shift)).astype(np.uint16), kind="stable"))
    return key


def _search_sorted(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """np.searchsorted(old, new) for ascending `new`. When neither is much longer than the other, one stable
    merge of the two (numpy's stable sort finds the two runs): a row of `new` is placed before equal rows of
    `old`, so its merged position less its own index counts the rows of `old` below it. About twice as fast
    as the binary searches on a batch against the open set; the searches when `old` is much longer."""
    if len(old) > 4 * len(new) or len(new) < 64 or old.dtype != new.dtype:
        return np.searchsorted(old, new)
    order = np.argsort(np.concatenate([new, old]), kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    return rank[:len(new)] - np.arange(len(new), dtype=np.int64)


def _merged(old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the rows of two address-sorted arrays without a common value go in their merge: (positions
    of the new rows, mask of the new rows)."""
    at_new = _search_sorted(old, new) + np.arange(len(new))
    is_new = np.zeros(len(old) + len(new), dtype=bool)
    is_new[at_new] = True
    return at_new, is_new


# the attributes of a row taken from the allocation event: row column -> event field
_FROM_ALLOC = {"alloc_ts": "ts", "tag": "tag", "pool_type": "pool_type", "size": "size", "address": "address",
               "session_id": "session_id", "cpu": "cpu", "pid": "pid", "tid": "tid", "alloc_stack": "stack"}


class Pairer:
    def __init__(self) -> None:
        self.stats = PairStats()
        self._open: dict[int, _Open] = {}
        self._store = _Store()

    def open_count(self) -> int:
        return sum(len(o.address) for o in self._open.values())

    def feed(self, ev: PoolEvents) -> Columns:
        """Pair one batch (later than every batch before). Returns the rows closed by it: freed,
        lost-free and free-without-alloc rows, with a `kind` column."""
        n_alloc = int(np.count_nonzero(ev.alloc))
        self.stats.allocs += n_alloc
        self.stats.frees += len(ev) - n_alloc
        if not len(ev):
            return _empty_rows()
        ns_all = ev.namespace
        if ns_all.min() == ns_all.max():  # usual: one namespace (no session pool)
            out = [self._feed_namespace(int(ns_all[0]), ev, None)]
        else:
            out = [self._feed_namespace(ns, ev, np.flatnonzero(ns_all == ns)) for ns in np.unique(ns_all).tolist()]
        self._store.compact(list(self._open.values()))
        out = [o for o in out if len(o)]
        return Columns.concat(out) if out else _empty_rows()

    def _feed_namespace(self, ns: int, ev: PoolEvents, sel: np.ndarray | None) -> Columns:
        """Pair the events `sel` of ev (all with None), those of namespace ns."""
        st = self._open.setdefault(ns, _Open())
        order, a = _key_order(ev.address if sel is None else ev.address[sel])
        idx = order if sel is None else sel[order]  # event indices in (key, time) order
        is_alloc = ev.alloc[idx]
        n = len(idx)
        first = np.ones(n, dtype=bool)
        first[1:] = a[1:] != a[:-1]
        last = np.ones(n, dtype=bool)
        last[:-1] = first[1:]
        # open allocation before each event: from the previous event on the key, or from earlier batches
        pos = _search_sorted(st.address, a)
        pos_c = np.minimum(pos, max(len(st.address) - 1, 0))
        in_open = (pos < len(st.address)) & (st.address[pos_c] == a) if len(st.address) else np.zeros(n, bool)
        prev_alloc = np.zeros(n, dtype=bool)
        prev_alloc[1:] = is_alloc[:-1]
        open_before = np.where(first, in_open, prev_alloc)
        from_old = first & in_open  # the open allocation before this event is an old one
        # --- rows closed by this batch: (1) old open allocations closed now, (2) allocations of this batch
        # closed by the next event on their key, (3) frees with nothing open (allocated before the trace)
        closes = open_before  # an alloc or a free on an open key closes the open allocation
        k_old = np.flatnonzero(closes & from_old)
        k_new = np.flatnonzero(closes & ~from_old)
        k_fwa = np.flatnonzero(~is_alloc & ~open_before)
        n_freed = int(np.count_nonzero(closes & ~is_alloc))
        self.stats.freed += n_freed
        self.stats.lost_free += len(k_old) + len(k_new) - n_freed
        self.stats.free_without_alloc += len(k_fwa)
        rows = self._rows(self._store, st.row[pos[k_old]], ev, idx[k_new - 1],
                          idx[np.concatenate([k_old, k_new])], is_alloc[np.concatenate([k_old, k_new])], idx[k_fwa])
        # --- new open set: old keys not touched, plus keys whose last event is an allocation (no key is in both)
        touched = np.zeros(len(st.address), dtype=bool)
        touched[pos[from_old]] = True
        keep = np.flatnonzero(~touched)
        live = idx[np.flatnonzero(last & is_alloc)]
        old_addr = st.address[keep]
        at_new, is_new = _merged(old_addr, ev.address[live])
        address = np.empty(len(is_new), dtype=np.uint64)
        address[at_new] = ev.address[live]
        address[~is_new] = old_addr
        row = np.empty(len(is_new), dtype=np.int64)
        row[at_new] = self._store.append(ev, live)
        row[~is_new] = st.row[keep]
        st.address, st.row = address, row
        return rows

    @staticmethod
    def _rows(store: _Store, old_rows: np.ndarray, ev: PoolEvents, new_from: np.ndarray, closer: np.ndarray,
              closer_alloc: np.ndarray, fwa: np.ndarray) -> Columns:
        """The closed rows, in this order: open allocations of earlier batches (`old_rows` of the store),
        allocations of this batch (events `new_from`) — each closed by its event in `closer` — then frees
        without an allocation (events `fwa`)."""
        n1, n2, n3 = len(old_rows), len(new_from), len(fwa)
        n = n1 + n2 + n3
        if not n:
            return _empty_rows()
        cols = {}
        for name, field_ in _FROM_ALLOC.items():
            src = getattr(ev, field_)
            col = np.empty(n, dtype=src.dtype)
            # gathered in place (no temporary); the row numbers are in range by construction, and mode="clip"
            # is the mode in which numpy writes into `out` unbuffered
            if n1:
                np.take(store.cols[name], old_rows, out=col[:n1], mode="clip")
            np.take(src, new_from, out=col[n1:n1 + n2], mode="clip")
            if name == "alloc_ts":
                col[n1 + n2:] = NO_TS
            elif name == "alloc_stack":
                col[n1 + n2:] = NO_STACK
            elif n3:
                np.take(src, fwa, out=col[n1 + n2:], mode="clip")
            cols[name] = col
        # a lost free has no free event: the closing allocation's stack is not this block's free stack
        ends = np.concatenate([closer, fwa])
        is_free = np.ones(n, dtype=bool)
        is_free[:n1 + n2] = ~closer_alloc
        cols["free_ts"] = ev.ts[ends]
        cols["free_stack"] = np.where(is_free, ev.stack[ends], NO_STACK)
        cols["free_cpu"] = np.where(is_free, ev.cpu[ends], 0).astype(ev.cpu.dtype)
        kind = np.full(n, FREE_WITHOUT_ALLOC, dtype=np.int8)
        kind[:n1 + n2] = np.where(closer_alloc, CLOSED_LOST_FREE, CLOSED_FREE)
        cols["kind"] = kind
        return Columns(cols)

    def finish(self) -> Columns:
        """The allocations still open: outstanding at the end of the trace."""
        out = []
        for st in self._open.values():
            if len(st.address):
                cols = {name: col[st.row] for name, col in self._store.cols.items()}
                n = len(st.address)
                cols["free_ts"] = np.full(n, NO_TS, dtype=np.int64)
                cols["free_stack"] = np.full(n, NO_STACK, dtype=cols["alloc_stack"].dtype)
                cols["free_cpu"] = np.zeros(n, dtype=cols["cpu"].dtype)
                cols["kind"] = np.full(n, OUTSTANDING, dtype=np.int8)
                out.append(Columns(cols))
                self.stats.outstanding += n
                self.stats.outstanding_bytes += int(cols["size"].sum())
        self._open.clear()
        self._store = _Store()
        return Columns.concat(out) if out else _empty_rows()
