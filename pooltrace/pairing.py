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
    """Open allocations of one namespace, sorted by address."""

    address: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    rows: Columns | None = None  # alloc attributes, same order


def _merge_order(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The stable sort order of concatenate([old, new]) for two sorted arrays, without sorting."""
    n_old, n_new = len(old), len(new)
    at_new = np.searchsorted(old, new, side="right") + np.arange(n_new)
    order = np.empty(n_old + n_new, dtype=np.int64)
    is_new = np.zeros(n_old + n_new, dtype=bool)
    is_new[at_new] = True
    order[at_new] = np.arange(n_old, n_old + n_new)
    order[~is_new] = np.arange(n_old)
    return order


class Pairer:
    def __init__(self) -> None:
        self.stats = PairStats()
        self._open: dict[int, _Open] = {}

    def open_count(self) -> int:
        return sum(len(o.address) for o in self._open.values())

    def feed(self, ev: PoolEvents) -> Columns:
        """Pair one batch (later than every batch before). Returns the rows closed by it: freed,
        lost-free and free-without-alloc rows, with a `kind` column."""
        self.stats.allocs += int(ev.alloc.sum())
        self.stats.frees += int(len(ev) - ev.alloc.sum())
        out = []
        for ns in np.unique(ev.namespace).tolist():
            sel = np.flatnonzero(ev.namespace == ns)
            out.append(self._feed_namespace(ns, ev, sel))
        out = [o for o in out if len(o)]
        return Columns.concat(out) if out else _empty_rows()

    def _feed_namespace(self, ns: int, ev: PoolEvents, sel: np.ndarray) -> Columns:
        st = self._open.setdefault(ns, _Open())
        addr = ev.address[sel]
        order = np.argsort(addr, kind="stable")  # by key, time order kept within a key
        idx = sel[order]  # event indices in (key, time) order
        a = addr[order]
        is_alloc = ev.alloc[idx]
        n = len(idx)
        first = np.ones(n, dtype=bool)
        first[1:] = a[1:] != a[:-1]
        last = np.ones(n, dtype=bool)
        last[:-1] = first[1:]
        # open allocation before each event: from the previous event on the key, or from earlier batches
        pos = np.searchsorted(st.address, a)
        pos_c = np.minimum(pos, max(len(st.address) - 1, 0))
        in_open = (pos < len(st.address)) & (st.address[pos_c] == a) if len(st.address) else np.zeros(n, bool)
        prev_alloc = np.zeros(n, dtype=bool)
        prev_alloc[1:] = is_alloc[:-1]
        open_before = np.where(first, in_open, prev_alloc)
        from_old = first & in_open  # the open allocation before this event is an old one
        # --- rows closed by this batch
        closes = open_before  # an alloc or a free on an open key closes the open allocation
        closer_kind = np.where(is_alloc, CLOSED_LOST_FREE, CLOSED_FREE)
        rows = []
        # (1) old open allocations closed now
        k_old = np.flatnonzero(closes & from_old)
        if len(k_old):
            old_rows = st.rows.take(pos[k_old])
            rows.append(self._close(old_rows, ev, idx[k_old], closer_kind[k_old]))
        # (2) allocations of this batch closed by the next event on their key
        k_new = np.flatnonzero(closes & ~from_old)
        if len(k_new):
            alloc_rows = self._alloc_rows(ev, idx[k_new - 1])
            rows.append(self._close(alloc_rows, ev, idx[k_new], closer_kind[k_new]))
        # (3) frees with nothing open: allocated before the trace
        k_fwa = np.flatnonzero(~is_alloc & ~open_before)
        if len(k_fwa):
            rows.append(self._free_without_alloc(ev, idx[k_fwa]))
        self.stats.freed += int((closes & ~is_alloc).sum())
        self.stats.lost_free += int((closes & is_alloc).sum())
        self.stats.free_without_alloc += len(k_fwa)
        # --- new open set: old keys not touched, plus keys whose last event is an allocation
        touched = np.zeros(len(st.address), dtype=bool)
        touched[pos[first & in_open]] = True
        keep = np.flatnonzero(~touched)
        k_live = np.flatnonzero(last & is_alloc)
        new_rows = self._alloc_rows(ev, idx[k_live])
        parts_addr = [st.address[keep], a[k_live]]
        parts_rows = ([st.rows.take(keep)] if st.rows is not None else []) + [new_rows]
        all_addr = np.concatenate(parts_addr)
        all_rows = Columns.concat([p for p in parts_rows if p is not None])
        srt = _merge_order(parts_addr[0], parts_addr[1])
        st.address = all_addr[srt]
        st.rows = all_rows.take(srt)
        return Columns.concat(rows) if rows else _empty_rows()

    @staticmethod
    def _alloc_rows(ev: PoolEvents, i: np.ndarray) -> Columns:
        return Columns({"alloc_ts": ev.ts[i], "tag": ev.tag[i], "pool_type": ev.pool_type[i], "size": ev.size[i],
                        "address": ev.address[i], "session_id": ev.session_id[i], "cpu": ev.cpu[i],
                        "pid": ev.pid[i], "tid": ev.tid[i], "alloc_stack": ev.stack[i]})

    @staticmethod
    def _close(rows: Columns, ev: PoolEvents, closer: np.ndarray, kind: np.ndarray) -> Columns:
        cols = dict(rows.cols)
        cols["free_ts"] = ev.ts[closer]
        # a lost free has no free event: the closing allocation's stack is not this block's free stack
        is_free = kind == CLOSED_FREE
        cols["free_stack"] = np.where(is_free, ev.stack[closer], NO_STACK)
        cols["free_cpu"] = np.where(is_free, ev.cpu[closer], 0).astype(ev.cpu.dtype)
        cols["kind"] = kind.astype(np.int8)
        return Columns(cols)

    @staticmethod
    def _free_without_alloc(ev: PoolEvents, i: np.ndarray) -> Columns:
        n = len(i)
        return Columns({"alloc_ts": np.full(n, NO_TS, dtype=np.int64), "tag": ev.tag[i],
                        "pool_type": ev.pool_type[i], "size": ev.size[i], "address": ev.address[i],
                        "session_id": ev.session_id[i], "cpu": ev.cpu[i], "pid": ev.pid[i], "tid": ev.tid[i],
                        "alloc_stack": np.full(n, NO_STACK, dtype=ev.stack.dtype), "free_ts": ev.ts[i],
                        "free_stack": ev.stack[i], "free_cpu": ev.cpu[i],
                        "kind": np.full(n, FREE_WITHOUT_ALLOC, dtype=np.int8)})

    def finish(self) -> Columns:
        """The allocations still open: outstanding at the end of the trace."""
        out = []
        for st in self._open.values():
            if st.rows is not None and len(st.address):
                cols = dict(st.rows.cols)
                n = len(st.address)
                cols["free_ts"] = np.full(n, NO_TS, dtype=np.int64)
                cols["free_stack"] = np.full(n, NO_STACK, dtype=cols["alloc_stack"].dtype)
                cols["free_cpu"] = np.zeros(n, dtype=cols["cpu"].dtype)
                cols["kind"] = np.full(n, OUTSTANDING, dtype=np.int8)
                out.append(Columns(cols))
                self.stats.outstanding += n
                self.stats.outstanding_bytes += int(cols["size"].sum())
        self._open.clear()
        return Columns.concat(out) if out else _empty_rows()
