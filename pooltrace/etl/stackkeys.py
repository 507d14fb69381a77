"""Deferred resolution of cached stacks (stack keys).

With stack caching the kernel logs StackKeyKernel/StackKeyUser references (0x1825/0x1826) and the
frames later, in KeyDelete/KeyRundown definitions (0x1823/0x1824), often after the reference; keys are
cache-entry addresses and are reused. The rule that resolves every reference of the real samples
(etl-format.md §2.2): a reference takes the earliest definition of its key at or after its timestamp.

The resolver consumes batches in time order and is vectorized per batch: references wait (by key)
until a definition arrives.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


class StackKeyResolver:
    def __init__(self) -> None:
        self._defs: list[pa.Array] = []  # frames of every definition, by definition id
        self._ndefs = 0
        self._pending: pa.Table | None = None  # references still waiting for a definition
        self.resolved = 0

    @property
    def unresolved(self) -> int:
        return 0 if self._pending is None else self._pending.num_rows

    def definitions(self) -> pa.ListArray:
        """Frames of every definition seen, indexed by the def_id given to resolved references."""
        if not self._defs:
            return pa.array([], type=pa.list_(pa.uint64()))
        return pa.concat_arrays(self._defs)

    def feed(self, refs: pa.Table | None, defs: pa.Table | None) -> pa.Table | None:
        """Add one batch of references and definitions (both sorted by time; this batch is later than
        every earlier one). Returns the references resolved now, with a `def_id` column."""
        parts = [t for t in (self._pending, refs) if t is not None and t.num_rows]
        if defs is not None and defs.num_rows:
            def_ids = np.arange(self._ndefs, self._ndefs + defs.num_rows, dtype=np.int64)
            self._defs.append(defs["frames"].combine_chunks())
            self._ndefs += defs.num_rows
        else:
            def_ids = np.zeros(0, dtype=np.int64)
        if not parts:
            return None
        pending = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        if not len(def_ids):
            self._pending = pending
            return None
        rkey = pending["key"].to_numpy()
        rts = pending["ts"].to_numpy()
        dkey = defs["key"].to_numpy()
        dts = defs["ts"].to_numpy()
        n_r = len(rkey)
        # One sorted sequence of references and definitions by (key, ts, kind); a definition sorts after a
        # reference with the same timestamp, so "the next definition of the key" is the earliest at or after it.
        key = np.concatenate([rkey, dkey])
        ts = np.concatenate([rts, dts])
        kind = np.concatenate([np.zeros(n_r, np.int8), np.ones(len(dkey), np.int8)])
        order = np.lexsort((kind, ts, key))
        is_def = kind[order] == 1
        pos = np.arange(len(order))
        next_def = np.where(is_def, pos, len(order))
        next_def = np.minimum.accumulate(next_def[::-1])[::-1]
        ref_at = np.flatnonzero(~is_def)
        target = next_def[ref_at]
        ok = target < len(order)
        target_safe = np.where(ok, target, 0)
        same_key = ok & (key[order][target_safe] == key[order][ref_at])
        ref_rows = order[ref_at]  # row numbers in `pending`
        def_rows = order[target_safe] - n_r
        done = ref_rows[same_key]
        resolved_to = def_ids[def_rows[same_key]]
        keep_order = np.argsort(done, kind="stable")  # back to time order
        done, resolved_to = done[keep_order], resolved_to[keep_order]
        out = pending.take(pa.array(done)).append_column("def_id", pa.array(resolved_to, type=pa.int64()))
        left = np.sort(ref_rows[~same_key])
        self._pending = pending.take(pa.array(left)) if len(left) else None
        self.resolved += len(done)
        return out
