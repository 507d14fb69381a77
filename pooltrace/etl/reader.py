"""EtlReader: the one path from an .etl file to decoded kernel events.

Opens the file, parses the logfile header, indexes the buffers, then streams chunks
of buffers in per-CPU merge order, decodes them (records.py, decode.py) and releases the typed tables
in global time order: rows sorted by (raw timestamp, CPU, read sequence). Memory stays at about one
buffer per CPU plus the rows waiting for the time watermark.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from pooltrace.errors import TraceError
from pooltrace.etl.buffers import (
    FLAG_BUFFER_LOST,
    FLAG_COMPRESSED,
    FLAG_EVENTS_LOST,
    BufferSource,
    FileBytes,
    scan_buffers,
)
from pooltrace.etl.chunks import DecodedChunk, decode_buffers, plan_chunks
from pooltrace.etl.columns import Columns
from pooltrace.etl.fragments import FragmentStore
from pooltrace.etl.logfile import LogfileHeader
from pooltrace.etl.records import (
    SYSTEM_LIKE,
    Chunk,
    decode_headers,
)

MAX_WARNINGS = 50
SORT_KEYS = [("ts", "ascending"), ("cpu", "ascending"), ("seq", "ascending")]


@dataclass
class ReadStats:
    """What the reader saw, skipped and lost. Filled in while batches are read."""

    file_size: int = 0
    buffers: int = 0
    compressed_buffers: int = 0
    buffers_flagged_events_lost: int = 0
    buffers_flagged_buffer_lost: int = 0
    buffers_skipped: int = 0
    bytes_skipped: int = 0
    records: int = 0
    by_header_type: Counter = field(default_factory=Counter)  # header type name -> records
    by_hook: Counter = field(default_factory=Counter)  # kernel HookId -> records
    by_classic: Counter = field(default_factory=Counter)  # (class GUID, opcode) -> records
    by_provider: Counter = field(default_factory=Counter)  # EVENT_HEADER provider GUID -> records
    malformed: Counter = field(default_factory=Counter)  # decoder name -> records too short / inconsistent
    first_ts: int | None = None  # raw timestamps of the earliest and latest record
    last_ts: int | None = None
    time_inversions: int = 0  # released rows earlier than rows released before them (should stay 0)
    warnings: list[str] = field(default_factory=list)

    def warn(self, msg: str) -> None:
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(msg)
        elif len(self.warnings) == MAX_WARNINGS:
            self.warnings.append("further warnings suppressed")


@dataclass
class Batch:
    """Decoded events released together, each table sorted by (ts, cpu, seq). Table names: pool,
    stacks, key_refs, key_defs, image, process, thread, header_extension, kernel_base, ktc_image_id,
    ktc_rsds. A name is absent when the batch has no such event. Tables are Arrow, but for the
    high-volume ones when the reader was asked for numpy Columns; then the stacks table (stack parts, which
    the joiner matches by owner and orders by seq itself) holds the right rows in no particular order."""

    tables: dict[str, pa.Table | Columns]
    _span: tuple[int, int] | None = field(default=None, repr=False, compare=False)

    def get(self, name: str) -> pa.Table | Columns | None:
        return self.tables.get(name)

    def first_ts(self) -> int:
        """The earliest timestamp in the batch."""
        return self._ts_span()[0]

    def last_ts(self) -> int:
        """The latest timestamp in the batch."""
        return self._ts_span()[1]

    def _ts_span(self) -> tuple[int, int]:
        """(earliest, latest) timestamp, computed once (the reader and the joiner each ask)."""
        if self._span is None:
            spans = [_ts_span(t) for t in self.tables.values()]
            self._span = min(a for a, _ in spans), max(b for _, b in spans)
        return self._span


def _ts_span(t: pa.Table | Columns) -> tuple[int, int]:
    """Earliest and latest timestamp of a released table (Arrow tables are in time order)."""
    if isinstance(t, Columns):
        ts = t.cols["ts"]
        return int(ts.min()), int(ts.max())
    return int(t["ts"][0].as_py()), int(t["ts"][-1].as_py())


def _time_order(t: Columns) -> np.ndarray | None:
    """The rows of t in (ts, cpu, seq) order, as indices; None when t is in that order already.

    The usual input is the rows left from the last release (in that order) followed by a chunk's rows in
    read order (seq ascending, later than every row left): a stable sort of one combined (ts, cpu) key
    then orders rows of equal (ts, cpu) by seq, which is checked on the result; the three-key sort is
    the fallback (timestamps too far apart for the combined key, or rows in another order)."""
    c = t.cols
    ts, cpu, seq = c["ts"], c["cpu"], c["seq"]
    if len(ts) < 2:
        return None
    lo, hi = int(ts.min()), int(ts.max())
    if hi - lo < 1 << 50 and int(cpu.max()) < 1 << 12:
        key = ((ts - lo) << 12) | cpu.astype(np.int64)
        order = None if bool((key[1:] >= key[:-1]).all()) else np.argsort(key, kind="stable")
        skey, sseq = (key, seq) if order is None else (key[order], seq[order])
        tie = np.flatnonzero(skey[1:] == skey[:-1])
        if not len(tie) or bool((sseq[tie + 1] > sseq[tie]).all()):
            return order
    order = np.lexsort((seq, cpu, ts))
    return None if not (np.diff(order) < 0).any() else order


def _split(parts: list, wm: int, everything: bool = False, arrow: bool = True, ordered: bool = True):
    """Rows released at watermark `wm` (ts < wm, sorted by ts, cpu, seq) and the rest, also sorted. Numpy
    Columns are released as Arrow unless `arrow` is False; they are not sorted unless `ordered`."""
    if isinstance(parts[0], Columns):
        t = Columns.concat(parts)
        if not ordered:
            return _cut(t, wm, everything)
        order = _time_order(t)
        if order is not None:
            t = t.take(order)
        n = len(t) if everything else int(np.searchsorted(t.cols["ts"], wm, side="left"))
        if not n:
            return None, t
        ready, rest = (t, None) if n == len(t) else (t.slice(0, n), t.slice(n, len(t)))
        return (ready.to_arrow() if arrow else ready), rest
    import pyarrow.compute as pc  # here only: importing it costs ~0.1 s, and the usual tables are Columns

    t = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    if everything:
        return t.sort_by(SORT_KEYS), None
    ready = pc.less(t["ts"], pa.scalar(wm, pa.int64()))
    now = t.filter(ready)
    rest = t.filter(pc.invert(ready))
    return (now.sort_by(SORT_KEYS) if now.num_rows else None), (rest if rest.num_rows else None)


def _cut(t: Columns, wm: int, everything: bool) -> tuple[Columns | None, Columns | None]:
    """Rows of t before `wm` and the others, each in t's order."""
    if everything:
        return t, None
    early = t.cols["ts"] < wm
    n = int(np.count_nonzero(early))
    if n == len(t):
        return t, None
    if not n:
        return None, t
    return t.take(np.flatnonzero(early)), t.take(np.flatnonzero(~early))


def _not_regular(mode: int) -> str | None:
    """What a path that is not a regular file is ("a named pipe", ...), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _starts_like_etl(data) -> bool:
    """The first buffer (never compressed) starts with the SYSTEM-header record of hook 0 (etl-format.md §1.5)."""
    if len(data) < 0x48 + 0x20:
        return False
    marker = bytes(data[0x48:0x50])
    return marker[2] in (1, 2) and marker[3] == 0xC0 and marker[6:8] == b"\x00\x00"


class EtlReader:
    """Read a Windows .etl file. Raises TraceError (one line) when the file is not a readable trace."""

    def __init__(self, path: str | os.PathLike, chunk_bytes: int = 4 << 20):
        self.path = Path(path)
        self.chunk_bytes = chunk_bytes
        try:
            kind = _not_regular(os.stat(self.path).st_mode)
            if kind:  # a named pipe or device would block in open() or never end: refuse before opening
                raise TraceError(f"{path}: not a regular file ({kind}); give an .etl file")
            self._fh = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise TraceError(f"{path}: cannot open: {exc.strerror or exc}") from None
        st_ = os.fstat(self._fh.fileno())
        if _not_regular(st_.st_mode):  # replaced between the check and the open
            self._fh.close()
            raise TraceError(f"{path}: not a regular file; give an .etl file")
        size = st_.st_size
        if size == 0:
            self.close()
            raise TraceError(f"{path}: empty file, not an .etl trace")
        self._data = FileBytes(self._fh.fileno(), size)
        self.stats = ReadStats(file_size=size)
        if not _starts_like_etl(self._data):
            self.close()
            raise TraceError(f"{path}: not an .etl trace (no logfile header record at offset 0x48)")
        self.index = scan_buffers(self._data)
        self.source = BufferSource(self._data, self.index)
        self.header = self._read_header()
        self.source.max_area = max(64 << 10, min(self.header.buffer_size, self.source.max_area))
        self.user_limit = np.uint64(0x0000800000000000 if self.header.pointer_size == 8 else 0x80000000)
        self._fragments: FragmentStore | None = None
        for w in self.index.warnings:
            self.stats.warn(w)
        self.stats.bytes_skipped += self.index.skipped_bytes
        if self.header.clock_problem:
            self.stats.warn(f"{self.header.clock_problem}: times are raw clock ticks since the trace start, "
                            "not nanoseconds")
        circular = self.header.log_file_mode & 0x2  # EVENT_TRACE_FILE_MODE_CIRCULAR
        if not circular and self.header.buffers_written > len(self.index):
            self.stats.warn(f"the logfile header says {self.header.buffers_written} buffers were written but the "
                            f"file holds {len(self.index)}: the file is truncated")

    def close(self) -> None:
        self._data = None
        self._fh.close()

    def __enter__(self) -> EtlReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read_header(self) -> LogfileHeader:
        name = self.path
        if len(self.index) == 0:
            why = self.index.warnings[0] if self.index.warnings else f"file is {self.stats.file_size} bytes"
            raise TraceError(f"{name}: cannot read the trace: no complete buffer ({why})")
        try:
            area = self.source.area(0)
        except ValueError as exc:
            raise TraceError(f"{name}: not an .etl trace (first buffer unreadable: {exc})") from None
        chunk = Chunk([area], [int(self.index.cpu[0])])
        recs, _, _ = decode_headers(chunk)
        if not len(recs) or recs.htype[0] not in SYSTEM_LIKE or recs.hook[0] != 0:
            raise TraceError(f"{name}: not an .etl trace (the first buffer does not start with a logfile header)")
        pos, plen = int(recs.payload[0]), int(recs.payload_len[0])
        try:
            hdr = LogfileHeader.parse(chunk.data[pos:pos + plen].tobytes(), int(recs.ts[0]),
                                      int(recs.pointer_size[0]))
        except ValueError as exc:
            raise TraceError(f"{name}: not an .etl trace ({exc})") from None
        if hdr.pointer_size not in (4, 8):
            raise TraceError(f"{name}: unsupported pointer size {hdr.pointer_size}")
        return hdr

    # -- streaming -------------------------------------------------------------------------------

    def batches(self, progress: Callable[[int, int], None] | None = None,
                fragments: FragmentStore | None = None, jobs: int = 1, columns: bool = False) -> Iterator[Batch]:
        """Decoded events in global time order, a batch at a time. Single pass; stats fill as it goes.
        `progress(done, total)` is called with buffers read so far after every chunk. With `fragments`,
        the frames of Stack events are interned there as each chunk is decoded, and the stacks table
        carries `frag` (fragment id) and `user` (a user-mode part) instead of `frames`: the time merge
        then moves fixed-width columns only. With `jobs` > 1, chunks are decoded in that many worker
        processes (parallel.py); the batches are the same for every `jobs`. With `columns`, the high-volume
        tables (pool, stacks, key_refs, key_defs) stay numpy Columns instead of becoming Arrow."""
        self._fragments = fragments
        idx = self.index
        st = self.stats
        st.buffers = len(idx)
        st.compressed_buffers = int((idx.flags & FLAG_COMPRESSED).astype(bool).sum())
        st.buffers_flagged_events_lost = int((idx.flags & FLAG_EVENTS_LOST).astype(bool).sum())
        st.buffers_flagged_buffer_lost = int((idx.flags & FLAG_BUFFER_LOST).astype(bool).sum())
        plan = plan_chunks(idx, self.chunk_bytes)
        pending: dict[str, list] = {}
        seq0 = 0
        last_ts = np.iinfo(np.int64).min
        done = 0
        for (buffers, wm), dc in zip(plan, self._chunks(plan, jobs), strict=True):
            decoded = self._apply(dc, seq0)
            seq0 += dc.counts.records
            done += len(buffers)
            if progress is not None:
                progress(done, len(idx))
            for name, t in decoded.items():
                pending.setdefault(name, []).append(t)
            out = {}
            for name, parts in pending.items():
                if parts:
                    now, rest = _split(parts, wm, arrow=not columns, ordered=not columns or name != "stacks")
                    pending[name] = [rest] if rest is not None else []
                    if now is not None:
                        out[name] = now
            if out:
                batch = Batch(out)
                if batch.first_ts() < last_ts:
                    st.time_inversions += 1
                last_ts = batch.last_ts()
                yield batch
        rest = {}
        for name, parts in pending.items():
            if parts:
                now, _ = _split(parts, np.iinfo(np.int64).max, everything=True, arrow=not columns,
                                ordered=not columns or name != "stacks")
                rest[name] = now
        if rest:
            yield Batch(rest)

    def _chunks(self, plan: list[tuple[list[int], int]], jobs: int) -> Iterator[DecodedChunk]:
        """Decoded chunks in plan order: here, or in `jobs` worker processes (parallel.py)."""
        digest_stacks = self._fragments is not None
        if jobs > 1 and len(plan) > 2:
            from pooltrace.etl.parallel import decode_in_workers

            yield from decode_in_workers(self, plan, jobs, digest_stacks)
            return
        for buffers, _wm in plan:
            yield decode_buffers(self.source, self.index, buffers, int(self.user_limit), digest_stacks)

    def _apply(self, dc: DecodedChunk, seq0: int) -> dict[str, Columns | pa.Table]:
        """Add a decoded chunk's counts to the statistics and number its rows from seq0."""
        st = self.stats
        c = dc.counts
        st.buffers_skipped += c.buffers_skipped
        st.bytes_skipped += c.bytes_skipped
        for w in c.warnings:
            st.warn(w)
        st.records += c.records
        if c.first_ts is not None:
            st.first_ts = c.first_ts if st.first_ts is None else min(st.first_ts, c.first_ts)
            st.last_ts = c.last_ts if st.last_ts is None else max(st.last_ts, c.last_ts)
        st.by_header_type.update(c.by_header_type)
        st.by_hook.update(c.by_hook)
        st.by_classic.update(c.by_classic)
        st.by_provider.update(c.by_provider)
        st.malformed.update(c.malformed)
        tables = {}
        for name, t in dc.tables.items():
            if isinstance(t, Columns):
                t.cols["seq"] += seq0
            else:
                t = t.set_column(t.schema.get_field_index("seq"), "seq", pa.array(t["seq"].to_numpy() + seq0))
            tables[name] = t
        if dc.digest is not None:
            stacks = tables["stacks"]
            stacks.cols["frag"] = self._fragments.add_digest(dc.digest)[stacks.cols["frag"]]
        return tables
