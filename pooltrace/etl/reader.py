"""EtlReader: the one path from an .etl file to decoded kernel events.

Opens the file, parses the logfile header, indexes the buffers, then streams chunks
of buffers in per-CPU merge order, decodes them (records.py, decode.py) and releases the typed tables
in global time order: rows sorted by (raw timestamp, CPU, read sequence). Memory stays at about one
buffer per CPU plus the rows waiting for the time watermark.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pooltrace.errors import TraceError
from pooltrace.etl.buffers import (
    FLAG_BUFFER_LOST,
    FLAG_COMPRESSED,
    FLAG_EVENTS_LOST,
    BufferSource,
    FileBytes,
    reading_order,
    scan_buffers,
)
from pooltrace.etl.columns import Columns
from pooltrace.etl.decode import decode_chunk
from pooltrace.etl.fragments import FragmentStore
from pooltrace.etl.logfile import LogfileHeader
from pooltrace.etl.records import (
    HEADER_TYPE_NAMES,
    IS_CLASSIC,
    IS_EVENT,
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
    ktc_rsds. A name is absent when the batch has no such event."""

    tables: dict[str, pa.Table]

    def get(self, name: str) -> pa.Table | None:
        return self.tables.get(name)


def _split(parts: list, wm: int, everything: bool = False):
    """Rows released at watermark `wm` (ts < wm, sorted by ts, cpu, seq, as Arrow) and the rest."""
    if isinstance(parts[0], Columns):
        t = Columns.concat(parts)
        ts = t.cols["ts"]
        if everything or (len(ts) and ts.max() < wm):
            ready, rest = np.arange(len(ts)), None
        else:
            mask = ts < wm
            ready = np.flatnonzero(mask)
            rest = t.take(np.flatnonzero(~mask)) if len(ready) < len(ts) else None
        if not len(ready):
            return None, t
        sub = t.take(ready) if len(ready) < len(ts) else t
        order = sub.sort_order()
        if (np.diff(order) < 0).any():
            sub = sub.take(order)
        return sub.to_arrow(), rest
    t = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    if everything:
        return t.sort_by(SORT_KEYS), None
    ready = pc.less(t["ts"], pa.scalar(wm, pa.int64()))
    now = t.filter(ready)
    rest = t.filter(pc.invert(ready))
    return (now.sort_by(SORT_KEYS) if now.num_rows else None), (rest if rest.num_rows else None)


def _guid_str(lo: int, hi: int) -> str:
    return str(uuid.UUID(bytes_le=int(lo).to_bytes(8, "little") + int(hi).to_bytes(8, "little")))


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
                fragments: FragmentStore | None = None) -> Iterator[Batch]:
        """Decoded events in global time order, a batch at a time. Single pass; stats fill as it goes.
        `progress(done, total)` is called with buffers read so far after every chunk. With `fragments`,
        the frames of Stack events are interned there as each chunk is decoded, and the stacks table
        carries `frag` (fragment id) and `user` (a user-mode part) instead of `frames`: the time merge
        then moves fixed-width columns only."""
        self._fragments = fragments
        idx = self.index
        st = self.stats
        st.buffers = len(idx)
        st.compressed_buffers = int((idx.flags & FLAG_COMPRESSED).astype(bool).sum())
        st.buffers_flagged_events_lost = int((idx.flags & FLAG_EVENTS_LOST).astype(bool).sum())
        st.buffers_flagged_buffer_lost = int((idx.flags & FLAG_BUFFER_LOST).astype(bool).sum())
        order, watermark = reading_order(idx, skip=1)
        first_wm = int(idx.first_ts[order].min()) if len(order) else np.iinfo(np.int64).max
        plan: list[tuple[list[int], int]] = [([0], first_wm)]
        group: list[int] = []
        acc = 0
        for k, b in enumerate(order.tolist()):
            group.append(b)
            acc += int(idx.filled[b])
            if acc >= self.chunk_bytes or k == len(order) - 1:
                plan.append((group, int(watermark[k])))
                group, acc = [], 0
        pending: dict[str, list] = {}
        seq0 = 0
        last_ts = np.iinfo(np.int64).min
        done = 0
        for buffers, wm in plan:
            decoded, n = self._decode(buffers, seq0)
            seq0 += n
            done += len(buffers)
            if progress is not None:
                progress(done, len(idx))
            for name, t in decoded.items():
                pending.setdefault(name, []).append(t)
            out = {}
            for name, parts in pending.items():
                if parts:
                    now, rest = _split(parts, wm)
                    pending[name] = [rest] if rest is not None else []
                    if now is not None:
                        out[name] = now
            if out:
                lo = min(int(t["ts"][0].as_py()) for t in out.values())
                if lo < last_ts:
                    st.time_inversions += 1
                last_ts = max(int(t["ts"][-1].as_py()) for t in out.values())
                yield Batch(out)
        rest = {}
        for name, parts in pending.items():
            if parts:
                now, _ = _split(parts, np.iinfo(np.int64).max, everything=True)
                rest[name] = now
        if rest:
            yield Batch(rest)

    def _decode(self, buffers: list[int], seq0: int) -> tuple[dict[str, pa.Table], int]:
        st = self.stats
        areas, cpus = [], []
        for b in buffers:
            try:
                areas.append(self.source.area(b))
                cpus.append(int(self.index.cpu[b]))
            except ValueError as exc:
                st.buffers_skipped += 1
                st.bytes_skipped += int(self.index.size[b])
                st.warn(f"buffer {b} at offset 0x{int(self.index.offset[b]):x} skipped: {exc}")
        for b, nbytes, nrec in self.source.hidden:
            st.bytes_skipped += nbytes
            st.warn(f"buffer {b} at offset 0x{int(self.index.offset[b]):x} is damaged: {nrec} records "
                    f"({nbytes} bytes) follow the end its header gives (filled size "
                    f"{int(self.index.filled[b])}); they were not read")
        self.source.hidden.clear()
        if not areas:
            return {}, 0
        chunk = Chunk(areas, cpus)
        recs, problems, dropped = decode_headers(chunk)
        for k, nbytes, reason in problems:
            st.bytes_skipped += nbytes
            st.warn(f"buffer {buffers[k]} (cpu {cpus[k]}): {reason}; last {nbytes} bytes skipped")
        if dropped:
            st.malformed["record header"] += dropped
        self._count(recs)
        dec = decode_chunk(chunk, recs, seq0)
        st.malformed.update(dec.malformed)
        stacks = dec.tables.get("stacks")
        if self._fragments is not None and stacks is not None:
            offsets, values = stacks.lists.pop("frames")
            stacks.cols["frag"] = self._fragments.add(values, offsets)
            stacks.cols["user"] = values[offsets[:-1]] < self.user_limit
        return dec.tables, len(recs)

    def _count(self, recs) -> None:
        st = self.stats
        st.records += len(recs)
        if len(recs):
            lo, hi = int(recs.ts.min()), int(recs.ts.max())
            st.first_ts = lo if st.first_ts is None else min(st.first_ts, lo)
            st.last_ts = hi if st.last_ts is None else max(st.last_ts, hi)
        types, counts = np.unique(recs.htype, return_counts=True)
        for t, c in zip(types.tolist(), counts.tolist(), strict=True):
            st.by_header_type[HEADER_TYPE_NAMES.get(t, f"0x{t:02x}")] += c
        hooks = recs.hook[recs.hook >= 0]
        if len(hooks):
            h, c = np.unique(hooks, return_counts=True)
            st.by_hook.update(dict(zip(h.tolist(), c.tolist(), strict=True)))
        classic = IS_CLASSIC[recs.htype]
        if classic.any():
            keys = np.column_stack([recs.guid[classic], recs.opcode[classic].astype(np.uint64)])
            u, c = np.unique(keys, axis=0, return_counts=True)
            for (lo, hi, op), n in zip(u.tolist(), c.tolist(), strict=True):
                st.by_classic[(_guid_str(lo, hi), int(op))] += n
        event = IS_EVENT[recs.htype]
        if event.any():
            u, c = np.unique(recs.guid[event], axis=0, return_counts=True)
            for (lo, hi), n in zip(u.tolist(), c.tolist(), strict=True):
                st.by_provider[_guid_str(lo, hi)] += n
