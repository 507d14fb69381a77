"""Stack attachment: give every pool event its call stack.

A StackWalk event (or a stack-key reference) belongs to the event on the **same CPU with the same
timestamp** (its EventTimeStamp; etl-format.md §2.2 — the timestamp alone mis-pairs on real traces).
Pool events carry a SYSTEM header with their ThreadId: then (StackThread, EventTimeStamp) must equal the
event's (ThreadId, timestamp), and the CPU only breaks ties, so a stack logged on another CPU, or two CPUs
logging the same timestamp, still attach exactly.
A kernel part and a user part may arrive separately, the user part when the thread returns to user mode,
sometimes much later and on another CPU: a part that matches no event on its CPU is matched by
(thread, timestamp) to an event whose thread is known. The final stack is kernel frames then user
frames. Pool events with a PERFINFO header have no thread or process: they take those of their stack.

Events are held back for a window of trace time (default 2 s) so that late parts can still arrive;
released events stay in time order. Fragments are deduplicated by a 128-bit hash of their frames; a
stack is the pair (kernel fragment, user fragment), numbered in order of first use. Stack-key
references become placeholders (key, generation) resolved when the key's definition arrives
(stackkeys.py states the rule), so nothing waits for a definition logged at the end of the trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pooltrace.etl.columns import Columns, span_positions
from pooltrace.etl.fragments import FragmentStore, Interner
from pooltrace.pairing import NO_STACK

NO_ID = 0xFFFFFFFF
PLACEHOLDER = 1 << 40  # fragment ids at or above this are stack-key placeholders
CPU_BITS = 12  # ETW processor index < 2048
class KeyPlaceholders:
    """Stack-key references as (key, generation) placeholders: generation g of a key resolves to the
    g-th definition of that key (0-based, time order) — the earliest definition at or after the ref."""

    def __init__(self, fragments: FragmentStore) -> None:
        self.fragments = fragments
        self._defs: dict[int, list[int]] = {}  # key -> fragment ids of its definitions, in time order
        self._ph: dict[tuple[int, int], int] = {}  # (key, generation) -> placeholder index
        self._ph_list: list[tuple[int, int]] = []

    def feed(self, refs: Columns | None, defs: Columns | None) -> np.ndarray:
        """Placeholder fragment ids for the refs (same batch's defs considered first)."""
        if defs is not None and len(defs):
            offsets, values = defs.lists["frames"]
            offsets = offsets.astype(np.int64)
            frag = self.fragments.add(values, offsets - offsets[0])
            dkey = defs.cols["key"]
            dts = defs.cols["ts"]
        else:
            dkey = np.zeros(0, np.uint64)
            dts = np.zeros(0, np.int64)
            frag = np.zeros(0, np.int64)
        if refs is None or not len(refs):
            for k, f in zip(dkey.tolist(), frag.tolist(), strict=True):
                self._defs.setdefault(k, []).append(f)
            return np.zeros(0, dtype=np.int64)
        rkey = refs.cols["key"]
        rts = refs.cols["ts"]
        # generation = definitions of the key before this batch + those in the batch strictly earlier
        gen = np.array([len(self._defs.get(k, ())) for k in rkey.tolist()], dtype=np.int64)
        if len(dkey):
            order = np.lexsort((dts, dkey))
            sk, sts = dkey[order], dts[order]
            lo = np.searchsorted(sk, rkey, side="left")
            hi = np.searchsorted(sk, rkey, side="right")
            for i in np.flatnonzero(hi > lo).tolist():  # refs whose key is also defined in this batch
                gen[i] += int(np.searchsorted(sts[lo[i]:hi[i]], rts[i], side="left"))
            for k, f in zip(sk.tolist(), frag[order].tolist(), strict=True):
                self._defs.setdefault(k, []).append(f)
        out = np.empty(len(rkey), dtype=np.int64)
        for i, pair in enumerate(zip(rkey.tolist(), gen.tolist(), strict=True)):
            j = self._ph.get(pair)
            if j is None:
                j = self._ph[pair] = len(self._ph_list)
                self._ph_list.append(pair)
            out[i] = PLACEHOLDER + j
        return out

    def resolve(self, frag: int) -> int | None:
        """The fragment a placeholder stands for, None while its definition has not been seen."""
        if frag < PLACEHOLDER:
            return frag
        key, gen = self._ph_list[frag - PLACEHOLDER]
        defs = self._defs.get(key, [])
        return defs[gen] if gen < len(defs) else None


@dataclass
class JoinStats:
    stack_events: int = 0  # Stack events and stack-key references seen
    attached: int = 0
    attached_by_thread: int = 0  # parts matched by (thread, timestamp) on another CPU
    unattached: int = 0  # stack parts that match no pool event
    extra_parts: int = 0  # a second kernel (or user) part for the same event, ignored
    unresolved_keys: int = 0  # set by StackTable.finish


def _compact(frag: np.ndarray) -> np.ndarray:
    """Fragment ids (-1, explicit ids, placeholders) as distinct values below 2**31."""
    out = np.where(frag >= PLACEHOLDER, frag - PLACEHOLDER + (1 << 30), frag) + 1
    if len(out) and (out.max() >= 1 << 31 or out.min() < 0):
        raise OverflowError("more than 2**30 distinct stack fragments")
    return out.astype(np.int64)


class StackTable:
    """Stacks = distinct (kernel fragment, user fragment) pairs, numbered in order of first use."""

    def __init__(self, fragments: FragmentStore, keys: KeyPlaceholders) -> None:
        self.fragments = fragments
        self.keys = keys
        self._ids = Interner()  # _compact(kernel) << 32 | _compact(user) -> stack id
        self._pairs: list[np.ndarray] = []  # (kernel, user) fragment ids of new stacks, in blocks
        self._solo = np.zeros(0, dtype=np.int64)  # kernel fragment id -> id of the stack of it alone, -1

    def ids(self, kfrag: np.ndarray, ufrag: np.ndarray) -> np.ndarray:
        has = (kfrag >= 0) | (ufrag >= 0)
        out = np.full(len(kfrag), NO_STACK, dtype=np.int64)
        if not has.any():
            return out
        every = bool(has.all())  # usual: every event has a stack
        k, u = (kfrag, ufrag) if every else (kfrag[has], ufrag[has])
        # a kernel part alone (the usual stack) is looked up by its fragment id in a dense table
        solo = (u < 0) & (k >= 0) & (k < PLACEHOLDER)
        if len(self._solo):
            got = np.where(solo & (k < len(self._solo)), self._solo[np.clip(k, 0, len(self._solo) - 1)], -1)
        else:
            got = np.full(len(k), -1, dtype=np.int64)
        rest = np.flatnonzero(got < 0)
        if len(rest):
            kr, ur = k[rest], u[rest]
            code = (_compact(kr) << 32) | _compact(ur)  # one int64 per pair: a fast 1-D unique
            g, known = self._ids.lookup(code)  # most stacks were seen before: only the others are numbered
            if not known.all():
                new_at = np.flatnonzero(~known)
                ucode, first, inverse = np.unique(code[new_at], return_index=True, return_inverse=True)
                ids, new = self._ids.ids(ucode, len(self._ids))
                first = new_at[first]
                if new.any():
                    self._pairs.append(np.stack([kr[first[new]], ur[first[new]]], axis=1))
                g[new_at] = ids[inverse.reshape(-1)]
            got[rest] = g
            alone = solo[rest]
            if alone.any():
                kk = kr[alone]
                if int(kk.max()) >= len(self._solo):
                    grown = np.full(max(int(kk.max()) + 1, 2 * len(self._solo)), -1, dtype=np.int64)
                    grown[:len(self._solo)] = self._solo
                    self._solo = grown
                self._solo[kk] = g[alone]
        if every:
            return got
        out[has] = got
        return out

    def frames(self) -> tuple[list[np.ndarray], int]:
        """Frames of every stack id (kernel part then user part) and how many stacks have a stack-key
        part whose definition never arrived (those keep only the parts that resolved)."""
        pairs = np.concatenate(self._pairs) if self._pairs else np.zeros((0, 2), dtype=np.int64)
        if not len(pairs):
            return [], 0
        unresolved = 0
        values, offsets = self.fragments.flat()
        lens = np.append(np.diff(offsets), 0)  # a missing part: the empty span after the last fragment
        starts, counts = [], []
        for side in (0, 1):
            frag = pairs[:, side].copy()
            for i in np.flatnonzero(frag >= PLACEHOLDER).tolist():  # stack-key parts: resolved one by one
                r = self.keys.resolve(int(frag[i]))
                unresolved += r is None
                frag[i] = -1 if r is None else r
            at = np.where(frag >= 0, frag, len(lens) - 1)
            starts.append(offsets[at])
            counts.append(lens[at])
        # kernel span then user span of every stack, gathered at once, then cut into one array per stack
        flat = values[span_positions(np.stack(starts, axis=1).ravel(), np.stack(counts, axis=1).ravel())]
        cut = [0, *np.cumsum(counts[0] + counts[1]).tolist()]
        return [flat[a:b] for a, b in zip(cut[:-1], cut[1:], strict=True)], unresolved  # views; np.split is slower


class _Parts:
    """A block of pending stack parts (one batch's stacks or references) and its event_ts range, so that a
    release touches only the blocks that reach below its time limit."""

    __slots__ = ("cols", "lo", "hi")

    def __init__(self, cols: Columns) -> None:
        self.cols = cols
        ets = cols.cols["event_ts"]
        self.lo, self.hi = int(ets.min()), int(ets.max())

    def split(self, limit: int) -> tuple[Columns | None, _Parts | None]:
        """(parts owned by events before `limit`, the block of the others), None for an empty side."""
        if self.hi < limit:
            return self.cols, None
        if self.lo >= limit:
            return None, self
        mine = self.cols.cols["event_ts"] < limit
        return self.cols.take(np.flatnonzero(mine)), _Parts(self.cols.take(np.flatnonzero(~mine)))


def _pool_columns(t: Columns) -> Columns:
    """The reader's pool rows with 0 for session_id where it has none."""
    cols = dict(t.cols)
    for name, valid in t.valid.items():
        cols[name] = np.where(valid, cols[name], cols[name].dtype.type(0))
    return Columns(cols)


def _sorted(a: np.ndarray) -> bool:
    return len(a) < 2 or bool((a[1:] >= a[:-1]).all())


class StackJoiner:
    """Feed it the reader's batches (read with numpy Columns); it releases pool events (time order) with
    stack ids, W late.

    Released events are numpy columns: the pool table's columns (session_id with 0 where the table has
    null), tid and pid completed from the stack, and `stack`."""

    def __init__(self, start_ticks: int, window_ticks: int, pointer_size: int) -> None:
        self.base = start_ticks
        self.window = window_ticks
        self.user_limit = np.uint64(0x0000800000000000 if pointer_size == 8 else 0x80000000)
        self.fragments = FragmentStore()
        self.keys = KeyPlaceholders(self.fragments)
        self.stacks = StackTable(self.fragments, self.keys)
        self.stats = JoinStats()
        self._pool: list[Columns] = []  # pending pool events, blocks in time order
        self._frag: list[_Parts] = []  # pending parts: owner cpu/ts, tid, pid, frag id, user flag, seq

    def feed(self, batch, watermark: int | None) -> Columns | None:
        """Add one batch; return the pool events that can no longer receive a stack part."""
        pool = batch.get("pool")
        if pool is not None and len(pool):
            self._pool.append(_pool_columns(pool))
        self._add_parts(batch)
        if watermark is None:
            return None
        return self._release(watermark - self.window)

    def finish(self) -> Columns | None:
        return self._release(None)

    def _add_parts(self, batch) -> None:
        stacks = batch.get("stacks")
        refs = batch.get("key_refs")
        defs = batch.get("key_defs")
        parts = []
        if stacks is not None and len(stacks) and "frag" in stacks.cols:  # interned by the reader
            parts.append(self._parts(stacks, stacks.cols["frag"], stacks.cols["user"]))
        elif stacks is not None and len(stacks):
            offsets, values = stacks.lists["frames"]
            offsets = offsets.astype(np.int64)
            offsets = offsets - offsets[0]
            frag = self.fragments.add(values, offsets)
            first = values[offsets[:-1]]
            parts.append(self._parts(stacks, frag, first < self.user_limit))
        ph = self.keys.feed(refs, defs)
        if refs is not None and len(refs):
            parts.append(self._parts(refs, ph, refs.cols["user"]))
        for p in parts:
            self.stats.stack_events += len(p)
            self._frag.append(_Parts(p))

    @staticmethod
    def _parts(t: Columns, frag: np.ndarray, user: np.ndarray) -> Columns:
        c = t.cols
        return Columns({"cpu": c["cpu"], "event_ts": c["event_ts"], "tid": c["tid"], "pid": c["pid"], "frag": frag,
                        "user": user.astype(bool, copy=False), "seq": c["seq"]})

    def _key(self, ts: np.ndarray, cpu: np.ndarray) -> np.ndarray:
        return ((ts - self.base) << CPU_BITS) | cpu.astype(np.int64)

    def _release(self, limit: int | None) -> Columns | None:
        if not self._pool:
            self._drop_parts(limit)
            return None
        if limit is None:
            n_ready = sum(len(b) for b in self._pool)
        else:  # the first event at or after the limit: blocks wholly before it, then a search in the next one
            n_ready = 0
            for b in self._pool:
                ts = b.cols["ts"]
                if ts[-1] >= limit:
                    n_ready += int(np.searchsorted(ts, limit, side="left"))
                    break
                n_ready += len(ts)
        if n_ready == 0:
            self._drop_parts(limit)
            return None
        ready, left = [], n_ready
        while left:
            b = self._pool[0]
            if len(b) <= left:
                ready.append(b)
                left -= len(b)
                self._pool.pop(0)
            else:
                ready.append(b.slice(0, left))
                self._pool[0] = b.slice(left, len(b))
                left = 0
        return self._attach(Columns.concat(ready), limit)

    def _take_parts(self, limit: int | None) -> Columns | None:
        """Remove and return the pending parts owned by events before `limit` (all with None), in arrival
        order."""
        if not self._frag:
            return None
        if limit is None:
            mine = [p.cols for p in self._frag]
            self._frag = []
        else:
            mine, keep = [], []
            for p in self._frag:
                a, b = p.split(limit)
                if a is not None:
                    mine.append(a)
                if b is not None:
                    keep.append(b)
            self._frag = keep
        return Columns.concat(mine) if mine else None

    def _drop_parts(self, limit: int | None) -> None:
        old = self._take_parts(limit)
        if old is not None:
            self.stats.unattached += len(old)

    def _attach(self, ready: Columns, limit: int | None) -> Columns:
        n = len(ready)
        rc = ready.cols
        ts = rc["ts"]
        cpu = rc["cpu"]
        tid = rc["tid"].copy()
        pid = rc["pid"].copy()
        kfrag = np.full(n, -1, dtype=np.int64)
        ufrag = np.full(n, -1, dtype=np.int64)
        cand = self._take_parts(limit)
        if cand is not None and len(cand):
            # same CPU, same timestamp (sort parts by arrival so the first part wins); the events come
            # sorted by (ts, cpu, seq), so their keys usually are already in order
            c = cand.cols
            owner = _owners(self._key(ts, cpu), rc["seq"], self._key(c["event_ts"], c["cpu"]), c["seq"])
            # an event that names its thread (SYSTEM header) only takes a part of that thread; another
            # event of the same CPU and timestamp, or one on another CPU, gets it below
            etid = tid[np.maximum(owner, 0)]
            owner[(owner >= 0) & (etid != NO_ID) & (etid != c["tid"])] = -1
            self._apply(owner, c, kfrag, ufrag, tid, pid)
            # parts on another CPU: by (thread, timestamp) against events whose thread is now known
            left = np.flatnonzero(owner < 0)
            if len(left):
                owner2 = self._by_thread(ts, tid, c["event_ts"][left], c["tid"][left])
                if owner2 is not None:
                    sub = Columns({k: v[left] for k, v in c.items()})
                    before = int((owner2 >= 0).sum())
                    self._apply(owner2, sub.cols, kfrag, ufrag, tid, pid)
                    self.stats.attached_by_thread += before
                    owner[left] = owner2
            self.stats.attached += int((owner >= 0).sum())
            self.stats.unattached += int((owner < 0).sum())
        out = dict(rc)
        out["tid"], out["pid"] = tid, pid
        out["stack"] = self.stacks.ids(kfrag, ufrag)
        return Columns(out)

    @staticmethod
    def _by_thread(ts: np.ndarray, tid: np.ndarray, p_ts: np.ndarray, p_tid: np.ndarray) -> np.ndarray | None:
        """For each part (timestamp, thread): the first event (lowest index) with that timestamp and that
        known thread, -1 when none; None when no event has a known thread."""
        known = tid != NO_ID
        if not known.any():
            return None
        if _sorted(ts):  # usual: the events come in time order, searched as they are
            idx = None
            e_ts, e_tid = ts, tid
        else:  # events with a known thread by (time, thread), stable: the lowest index first
            idx = np.flatnonzero(known)
            idx = idx[np.lexsort((tid[idx], ts[idx]))]
            e_ts, e_tid = ts[idx], tid[idx]
        lo = np.searchsorted(e_ts, p_ts, side="left")
        hi = np.searchsorted(e_ts, p_ts, side="right")
        owner2 = np.full(len(p_ts), -1, dtype=np.int64)
        for j in np.flatnonzero(hi > lo).tolist():  # few: late parts on another CPU
            cand = e_tid[lo[j]:hi[j]]
            m = np.flatnonzero((cand == p_tid[j]) & (cand != NO_ID))
            if len(m):
                at = lo[j] + m[0]
                owner2[j] = at if idx is None else idx[at]
        return owner2

    def _apply(self, owner, c, kfrag, ufrag, tid, pid) -> None:
        """Give each owner its first kernel part and first user part (parts are in arrival order)."""
        got = np.flatnonzero(owner >= 0)
        if not len(got):
            return
        own_all = owner[got]
        user = c["user"][got]
        missing = tid[own_all] == NO_ID  # thread and process of PERFINFO events come from their stack
        # arrival order decides only between parts of one owner: sort by it only when some owner has two
        # (an owner twice among kernel parts or among user parts: one search over owner * 2 + user)
        repeats = _repeats(own_all * 2 + user, 2 * len(tid)) or \
            (bool(missing.any()) and _repeats(own_all[missing], len(tid)))
        if repeats:
            seq = c["seq"][got]
            if not _sorted(seq):
                o = np.argsort(seq, kind="stable")
                got, own_all, user, missing = got[o], own_all[o], user[o], missing[o]
        frag = c["frag"]
        for flag, target in ((False, kfrag), (True, ufrag)):
            k = np.flatnonzero(user) if flag else np.flatnonzero(~user)
            sel, own = got[k], own_all[k]
            if not repeats or len(own) < 2 or bool((own[1:] > own[:-1]).all()):
                uniq, first = own, None  # every owner once: each part is its owner's first
            else:  # each owner's first part: written last when the parts are written in reverse
                at = np.full(len(target), -1, dtype=np.int64)
                at[own[::-1]] = np.arange(len(own) - 1, -1, -1)
                uniq = np.flatnonzero(at >= 0)
                first = at[uniq]
            free = target[uniq] < 0
            n_free = int(np.count_nonzero(free))
            if n_free == len(uniq):  # usual: no owner has this kind of part yet
                target[uniq] = frag[sel if first is None else sel[first]]
            else:
                target[uniq[free]] = frag[sel[free] if first is None else sel[first[free]]]
            self.stats.extra_parts += int(len(sel) - n_free)
        tid[own_all[missing]] = c["tid"][got[missing]]
        pid[own_all[missing]] = c["pid"][got[missing]]


def _owners(ekey: np.ndarray, eseq: np.ndarray, pkey: np.ndarray, pseq: np.ndarray) -> np.ndarray:
    """For each part (key pkey, read sequence pseq): the lowest index of an event whose key (ekey) equals
    its own, -1 when none. A part is usually read right after its event (seq + 1): that event is checked
    first through a table indexed by seq, and accepted when its key matches and no earlier event has the
    key; only the other parts are searched (sorted keys; the stable argsort when the keys are not)."""
    n = len(ekey)
    todo = None
    if _sorted(ekey):
        order, skey = None, ekey
        s0 = int(eseq.min())
        span = int(eseq.max()) - s0 + 1
        if span <= 4 * n + 4096:  # seq numbers of the events are dense enough for a table
            # slot: seq -> index of the event read there when it is the first of its key, else -1; the last
            # slot answers the seq numbers outside the events'
            first = np.empty(n, dtype=bool)
            first[0] = True
            np.not_equal(ekey[1:], ekey[:-1], out=first[1:])
            slot = np.full(span + 1, -1, dtype=np.int64)
            slot[eseq - s0] = np.where(first, np.arange(n, dtype=np.int64), -1)
            q = pseq - (s0 + 1)
            q[(q < 0) | (q >= span)] = span
            e = slot[q]
            ok = ekey[e] == pkey  # e = -1 reads the last event: masked below
            ok &= e >= 0
            owner = np.where(ok, e, -1)
            todo = np.flatnonzero(~ok)
            if not len(todo):
                return owner
    else:
        order = np.argsort(ekey, kind="stable")
        skey = ekey[order]
    keys = pkey if todo is None else pkey[todo]
    at = np.minimum(np.searchsorted(skey, keys), n - 1)
    hit = skey[at] == keys
    found = np.where(hit, at if order is None else order[at], -1)
    if todo is None:
        return found
    owner[todo] = found
    return owner


def _repeats(owners: np.ndarray, n: int) -> bool:
    """Some owner is in `owners` twice."""
    if len(owners) < 2:
        return False
    seen = np.zeros(n, dtype=bool)
    seen[owners] = True
    return int(np.count_nonzero(seen)) != len(owners)
