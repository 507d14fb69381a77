"""The per-tag baseline: how much of each pool tag was in use when the trace started and when it stopped,
which the trace's own alloc/free events cannot tell (blocks allocated before the trace are never seen).

Two sources, in this order:

* ``sidecar`` — the kernel's per-tag counters that ``pooltrace record`` saves beside its trace (only the
  recorded tags; sidecar.py);
* ``pool_snapshot`` — the pool snapshot the kernel itself logs in every trace with the POOL group on:
  PoolSnap events (SYSTEM_POOLTAG per tag, 0x0E28 at the start, 0x0E29 at the stop) and BigPoolSnap events
  (each big block's address, size and tag, 0x0E2A/0x0E2B).

A baseline entry per tag and moment is ``{"allocs", "bytes", "paged_allocs", "paged_bytes",
"nonpaged_allocs", "nonpaged_bytes"}`` and, when the trace has session snapshots (0x0E2C/0x0E2D, older
kernels), ``"session_allocs", "session_bytes"`` summed over the sessions: outstanding allocations (allocs
minus frees; the kernel's 32-bit counters wrap, so the difference is taken modulo 2**32) and bytes in use,
in total and per pool.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pooltrace.tags import format_tag

WHENS = ("start", "stop")
SOURCE_SIDECAR, SOURCE_SNAPSHOT = "sidecar", "pool_snapshot"
_WRAP = 1 << 32


def counters_entry(e: dict) -> dict:
    """One tag's counters (``paged_allocs``, ``paged_frees``, ``paged_bytes``, the nonpaged ones, and
    optionally ``session_allocs``/``session_bytes`` already outstanding) as a baseline entry."""
    paged = (e["paged_allocs"] - e["paged_frees"]) % _WRAP
    nonpaged = (e["nonpaged_allocs"] - e["nonpaged_frees"]) % _WRAP
    out = {"allocs": paged + nonpaged, "bytes": e["paged_bytes"] + e["nonpaged_bytes"],
           "paged_allocs": paged, "paged_bytes": e["paged_bytes"],
           "nonpaged_allocs": nonpaged, "nonpaged_bytes": e["nonpaged_bytes"]}
    if e.get("session_allocs") is not None:
        out.update(session_allocs=e["session_allocs"], session_bytes=e["session_bytes"])
        out["allocs"] += e["session_allocs"]
        out["bytes"] += e["session_bytes"]
    return out


def from_counters(snapshots: dict[str, list[dict] | None]) -> dict[str, dict]:
    """``{tag: {"start": entry | None, "stop": entry | None}}`` from per-moment lists of tag counters."""
    out: dict[str, dict] = {}
    for when in WHENS:
        for e in snapshots.get(when) or ():
            out.setdefault(e["tag"], dict.fromkeys(WHENS))[when] = counters_entry(e)
    return out


class PoolSnapshots:
    """Collects the PoolSnap and BigPoolSnap rows of a trace (the reader's ``pool_snap`` and
    ``big_pool_snap`` tables) as they arrive."""

    def __init__(self) -> None:
        self._tags: list[pa.Table] = []
        self._big: list[pa.Table] = []
        self._big_start: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def feed(self, batch) -> None:
        for name, into in (("pool_snap", self._tags), ("big_pool_snap", self._big)):
            t = batch.get(name)
            if t is not None and t.num_rows:
                into.append(t)
                if name == "big_pool_snap":
                    self._big_start = None

    def tag_counters(self) -> dict[str, list[dict] | None]:
        """Per moment, the tags' counters in the form :func:`from_counters` takes (None: no such snapshot).
        Session snapshots add each tag's outstanding allocations and bytes over all sessions; a tag listed
        twice in one snapshot (two loggers' rundowns merged) is summed."""
        out: dict[str, list[dict] | None] = dict.fromkeys(WHENS)
        if not self._tags:
            return out
        merged: dict[tuple[str, str], dict] = {}
        for row in pa.concat_tables(self._tags).to_pylist():
            key = (WHENS[row["end"]], format_tag(row["tag"]))
            e = merged.setdefault(key, {"tag": key[1], "paged_allocs": 0, "paged_frees": 0, "paged_bytes": 0,
                                        "nonpaged_allocs": 0, "nonpaged_frees": 0, "nonpaged_bytes": 0})
            if row["session_id"] is None:
                for k in ("paged_allocs", "paged_frees", "nonpaged_allocs", "nonpaged_frees"):
                    e[k] += row[k]
                e["paged_bytes"] += row["paged_used"]
                e["nonpaged_bytes"] += row["nonpaged_used"]
            else:
                outstanding = ((row["paged_allocs"] - row["paged_frees"]) % _WRAP
                               + (row["nonpaged_allocs"] - row["nonpaged_frees"]) % _WRAP)
                e["session_allocs"] = e.get("session_allocs", 0) + outstanding
                e["session_bytes"] = e.get("session_bytes", 0) + row["paged_used"] + row["nonpaged_used"]
        for (when, _), e in merged.items():
            out[when] = (out[when] or []) + [e]
        return out

    def big_blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The big blocks of the start snapshot as (addresses sorted, sizes, tags); bit 0 (non-paged) is
        cleared from the address so it equals the block's address in pool events."""
        if self._big_start is None:
            t = pa.concat_tables(self._big) if self._big else None
            if t is None or not t.num_rows:
                empty = np.zeros(0, np.uint64)
                self._big_start = (empty, empty, np.zeros(0, np.uint32))
            else:
                # global big pool only: a session's blocks are keyed by session in the pairing
                start = ~t["end"].to_numpy(zero_copy_only=False) & t["session_id"].is_null().to_numpy(
                    zero_copy_only=False)
                addr = t["virtual_address"].to_numpy()[start] & ~np.uint64(1)
                order = np.argsort(addr, kind="stable")
                self._big_start = (addr[order], t["size"].to_numpy()[start][order],
                                   t["tag"].to_numpy()[start][order].astype(np.uint32))
        return self._big_start

    def summary(self) -> dict | None:
        """What the trace's snapshots hold, per moment: distinct tags, big blocks and their bytes (sessions
        included); None when the trace has no snapshot."""
        if not self._tags and not self._big:
            return None
        out = {}
        tags = pa.concat_tables(self._tags) if self._tags else None
        big = pa.concat_tables(self._big) if self._big else None
        for k, when in enumerate(WHENS):
            n_tags = len(set(np.asarray(tags["tag"])[np.asarray(tags["end"]) == bool(k)].tolist())) if tags else 0
            if big is not None:
                sel = big["end"].to_numpy(zero_copy_only=False) == bool(k)
                n_big, big_bytes = int(sel.sum()), int(big["size"].to_numpy()[sel].sum())
            else:
                n_big, big_bytes = 0, 0
            out[when] = {"tags": n_tags, "big_blocks": n_big, "big_bytes": big_bytes} if n_tags or n_big else None
        return out


def choose(sidecar_counters: dict[str, list[dict] | None] | None,
           snapshots: PoolSnapshots | None) -> tuple[dict[str, dict], str | None]:
    """The baseline and its source: the sidecar's counters when it has any (they are read by pooltrace
    itself at the start and the stop), else the trace's PoolSnap events, else none."""
    if sidecar_counters and any(sidecar_counters.get(w) for w in WHENS):
        return from_counters(sidecar_counters), SOURCE_SIDECAR
    if snapshots is not None:
        counters = snapshots.tag_counters()
        if any(counters.get(w) for w in WHENS):
            return from_counters(counters), SOURCE_SNAPSHOT
    return {}, None


def fill_free_without_alloc(kind: np.ndarray, address: np.ndarray, size: np.ndarray, tag: np.ndarray,
                            blocks: tuple[np.ndarray, np.ndarray, np.ndarray], fwa_kind: int) -> int:
    """Give free_without_alloc rows (``kind == fwa_kind``) whose address is a big block of the start
    snapshot that block's size and tag, in place; returns how many rows were filled."""
    addrs, sizes, tags = blocks
    rows = np.flatnonzero(kind == fwa_kind)
    if not len(rows) or not len(addrs):
        return 0
    at = np.searchsorted(addrs, address[rows].astype(np.uint64))
    ok = at < len(addrs)
    ok[ok] = addrs[at[ok]] == address[rows[ok]].astype(np.uint64)
    hit, src = rows[ok], at[ok]
    size[hit] = sizes[src]
    tag[hit] = tags[src]
    return len(hit)
