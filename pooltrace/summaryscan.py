"""The dataset's summary (pooltrace.summary) computed by `pair` from the allocation rows it writes, instead of
re-reading allocations.parquet once it is complete: the same scan as `write_summary` (analysis._scan over the
default window, no filter), block by block, on the columns of each row group as they are written.

The window ends where the trace ends, known when the reader's last batch is out: until then the row groups'
columns are kept (at most KEEP_BYTES; beyond that the summary is left to write_summary, which re-reads the
file); from then on they are scanned on a thread of their own while `pair` finishes (the last row group is
scanned while Arrow encodes it). The columns are the values datasetopen reads back from the file: times with
NULL_NS where null, no stack as -1, and the tags as codes in the order datasetopen gives them (each row
group's tag names in the order of their first row: the order of the row group's Parquet dictionary).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pooltrace.analysis import AIFO, OUT_COLUMNS, _add_classes, end_within, lifetimes, parse_window, per_key
from pooltrace.datasetopen import NULL_NS, column_dtype
from pooltrace.growth import GrowthCounts

_I64 = np.iinfo(np.int64)

KEEP_BYTES = 64 << 20  # columns kept until the window is known (40 bytes per allocation row: 1.6 M rows)
# a row group with more distinct tags than this could outgrow its Parquet dictionary page (1 MB; a tag name is
# at most 16 characters); its dictionary's order would then not be the order of first appearance
MAX_GROUP_TAGS = 10_000
COLUMNS = {"alloc_ns": np.int64, "free_ns": np.int64, "size": np.uint64, "alloc_stack": np.int64,
           "pid": np.uint32, "tag": np.uint32}  # a block's columns (tag: the raw tag, its code comes at the end)


class RowScan:
    """The summary's scan of the dataset being written in `ds_dir`, fed row group by row group (`add`, from
    the Parquet writer's thread, in row order), started once the trace's duration is known (`start`); after
    the last row group the arrays are computed and written on the scan's thread (summary.Partial) while the
    group is encoded; `write` completes summary.npz once allocations.parquet is."""

    def __init__(self, ds_dir: Path) -> None:
        self._dir = ds_dir
        self._partial = None  # summary.Partial once the last row group is scanned
        self._lock = threading.Lock()
        self._kept: list[tuple[int, dict[str, np.ndarray]]] = []  # (first row, columns) until `start`
        self._kept_bytes = 0
        self._given_up = False  # too many rows kept, or a row group this scan cannot reproduce
        self._pool: ThreadPoolExecutor | None = None
        self._done: list[Future] = []
        self._codes: dict[str, int] = {}  # tag name -> code, in datasetopen's order
        self._name: dict[int, str] = {}  # raw tag -> name
        self._window = None
        self._end = 0
        self._counts, self._nbytes = np.zeros(5, dtype=np.int64), np.zeros(5)
        self._sel: list[np.ndarray] = []
        self._out: dict[str, list[np.ndarray]] = {name: [] for name in OUT_COLUMNS}
        self._growth: GrowthCounts | None = None  # keys: stack + 1 (0: no stack), grown with the stacks seen

    def add(self, at: int, cols: dict[str, np.ndarray], tags: np.ndarray, names: list[str],
            last: bool = False) -> None:
        """A row group's columns (COLUMNS; this scan's from now on), its first row `at`, and its distinct raw
        tags in the order of their first row with their names; `last`: no row group comes after it."""
        with self._lock:
            if self._given_up:
                return
            if len(tags) > MAX_GROUP_TAGS:
                self._give_up()
                return
            for raw, name in zip(tags.tolist(), names, strict=True):
                self._name[raw] = name
                self._codes.setdefault(name, len(self._codes))
            if self._pool is not None:
                self._done.append(self._pool.submit(self._scan, at, cols))
                if last:
                    self._done.append(self._pool.submit(self._prepare))
                return
            self._kept.append((at, cols))
            # the rows' bytes: the columns may be views of larger buffers whose pages past them were never
            # written (not resident)
            self._kept_bytes += sum(a.nbytes for a in cols.values())
            if self._kept_bytes > KEEP_BYTES:
                self._give_up()

    def _give_up(self) -> None:
        self._given_up = True
        self._kept.clear()

    def start(self, duration_ns: int | None) -> None:
        """The trace's duration is known (None: there is no summary): scan what is kept, and from now on each
        row group as it comes, on a thread."""
        with self._lock:
            if duration_ns is None or not _I64.min <= duration_ns < _I64.max:
                # no duration; or one from a damaged time that trace.json's check refuses (write_summary, which
                # the caller falls back to, then says so) and the int64 bins could not hold
                self._give_up()
            if self._given_up:
                return
            self._window = parse_window(None, duration_ns)  # as write_summary: the default window
            self._end = end_within(self._window, duration_ns)  # as analysis.effective_end
            self._growth = GrowthCounts(0, self._window.start_ns, self._end, NULL_NS)
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="pooltrace-summary")
            self._done = [self._pool.submit(self._scan, at, cols) for at, cols in self._kept]
            self._kept.clear()

    def _scan(self, at: int, cols: dict[str, np.ndarray]) -> None:
        """analysis._scan's work on one block (no filter, by stack); growth keys are stack + 1 (0: no stack),
        counted in a table that grows with the stacks seen (the number of stacks is known at the end; sums of
        sizes are exact in any grouping, GrowthCounts)."""
        cls = lifetimes(cols, self._window)
        _add_classes(self._counts, self._nbytes, cols["size"], cls)
        hit = np.flatnonzero(cls == AIFO)
        self._sel.append(hit + at)
        for name in OUT_COLUMNS:
            self._out[name].append(cols[name][hit])
        stack = cols["alloc_stack"]
        if len(stack) and stack.min() < -1:  # not a row pair writes; write_summary wraps them
            raise ValueError("stack reference below -1")
        key = stack + 1
        self._growth.grow(int(key.max()) + 1 if len(key) else 0)
        self._growth.add(cols["alloc_ns"], cols["free_ns"], cols["size"], key)

    def _content(self) -> dict[str, np.ndarray]:
        """summary.content's arrays from the rows scanned."""
        from pooltrace.summary import content

        sel = np.concatenate(self._sel) if self._sel else np.zeros(0, dtype=np.intp)
        out = {name: np.concatenate(parts) if parts else np.zeros(0, dtype=column_dtype(name))
               for name, parts in self._out.items()}
        raw = out["tag"]
        distinct, inverse = np.unique(raw, return_inverse=True)
        code = np.array([self._codes[self._name[t]] for t in distinct.tolist()], dtype=np.int32)
        out["tag"] = code[inverse.reshape(-1)] if len(raw) else np.zeros(0, dtype=np.int32)
        pk = per_key(sel, out, "stack", list(self._codes))
        g = self._growth
        g.grow(int(pk.keys.max()) + 2 if len(pk.keys) else 0)  # (every outstanding row's stack was counted)
        index = pk.keys + 1  # growth key of each outstanding stack (-1, no stack: 0)
        bins = [x.reshape(g.keys + 1, -1)[index] for x in (g.up_w, g.up_c, g.down_w, g.down_c)]
        return content((self._window.start_ns, self._end), self._counts, self._nbytes, pk, bins)

    def _prepare(self) -> None:
        from pooltrace.summary import Partial

        self._partial = Partial(self._dir, self._content())

    def write(self, rows: int, stacks: int, size: int, crc: int) -> bool:
        """Complete summary.npz for allocations.parquet of `rows` rows, `size` bytes and CRC-32 `crc`, and
        `stacks` stacks; False when this scan gave up (write_summary then reads the file)."""
        for done in self._done:
            done.result()  # a scan's error is raised here
        if self._window is None or self._given_up:
            return False
        if self._partial is None:  # the last row group was not known as such
            self._prepare()
        self._partial.finish((size, crc, rows), stacks)
        return True

    def close(self) -> None:
        """Stop the scan; a summary not completed is removed."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._partial is not None:
            self._partial.abort()
