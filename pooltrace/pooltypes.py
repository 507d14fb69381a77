"""Pool types by name, for every view that shows or filters them (tags, report --list and JSON, --pool).

A logged PoolType is the legacy POOL_TYPE the allocation maps to, masked with 0x26D: 0 non-paged
(executable), 1 paged, 0x200 non-paged NX, +4 cache aligned, +0x20 session; the kernel adds 0x10000000
for blocks above 0xFE0 bytes ("big" pool) and 0x200 on frees of NX blocks (etl-format.md, Corrections).
Session pool is also told by the event itself (0x0E21/0x0E23), which is what the dataset's ``session``
column holds. Importing it loads nothing else (the CLI reads FILTERS while building its options).
"""

from __future__ import annotations

PAGED, CACHE_ALIGNED, SESSION, NX, BIG = 0x1, 0x4, 0x20, 0x200, 0x10000000

# The pool a block lives in (tags groups by it): index = kind code.
KINDS = ("NonPaged", "NonPagedNx", "Paged", "Session")
NONPAGED, NONPAGED_NX, PAGED_KIND, SESSION_KIND = range(4)
FILTERS = ("paged", "nonpaged", "nx", "session")  # --pool


def kind_codes(pool_type, session):
    """Per block, its index into KINDS."""
    import numpy as np

    pool_type = np.asarray(pool_type).astype(np.uint32)
    out = np.where(pool_type & PAGED, PAGED_KIND, np.where(pool_type & NX, NONPAGED_NX, NONPAGED))
    return np.where(np.asarray(session, dtype=bool) | (pool_type & SESSION).astype(bool), SESSION_KIND,
                    out).astype(np.int8)


def name(pool_type: int, session: bool = False) -> str:
    """Readable name of one block's pool type: ``NonPagedNx``, ``Paged``, ``PagedSession``,
    ``NonPaged CacheAligned``, ``Paged big`` (a block above 0xFE0 bytes)."""
    pool_type = int(pool_type)
    base = "Paged" if pool_type & PAGED else "NonPagedNx" if pool_type & NX else "NonPaged"
    if session or pool_type & SESSION:
        base += "Session"
    parts = [base]
    if pool_type & CACHE_ALIGNED:
        parts.append("CacheAligned")
    if pool_type & BIG:
        parts.append("big")
    return " ".join(parts)


def filter_mask(which: str | None, pool_type, session):
    """Blocks in the pool `which` names (FILTERS): ``paged`` (not session), ``nonpaged`` (NX or not,
    session or not), ``nx`` (non-paged NX), ``session``; None for no filter."""
    if which is None:
        return None
    if which not in FILTERS:
        raise ValueError(f"pool {which!r}: one of {', '.join(FILTERS)}")
    import numpy as np

    pool_type = np.asarray(pool_type).astype(np.uint32)
    paged = (pool_type & PAGED).astype(bool)
    session = np.asarray(session, dtype=bool)
    return {"paged": paged & ~session, "nonpaged": ~paged, "nx": ~paged & (pool_type & NX).astype(bool),
            "session": session}[which]
