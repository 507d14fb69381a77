"""The buffer layer of an .etl file: index every WMI_BUFFER_HEADER, decompress, and plan the reading
order that merges the per-CPU streams by time.

An .etl file is the logger's buffers back to back (etl-format.md §1.1). Each buffer is stepped over by
its own BufferSize (relogged files have a small header buffer; compressed buffers are packed with no
alignment), its data ends at Offset (§1.2), and it belongs to one CPU whose records never go back in
time (§1.7). Reading buffers in order of their first record's timestamp, CPU by CPU in SequenceNumber
order, lets the reader release events in global time order while holding at most about one buffer per
CPU.
"""

from __future__ import annotations

import heapq
import os
import struct
from dataclasses import dataclass, field

import numpy as np
import pyfwnt

from pooltrace.etl import xpress

BUFFER_HEADER_SIZE = 0x48
_HDR = struct.Struct("<IIIIqQQHHIIHH")  # BufferSize .. BufferType (0x00..0x38)

FLAG_EVENTS_LOST = 0x0002
FLAG_BUFFER_LOST = 0x0004
FLAG_COMPRESSED = 0x0040
PROCESSOR_INDEX_MASK = 0x07FF
MAX_BUFFER_DATA = 64 * 1024 * 1024  # sanity bound for a decompressed buffer

# RtlDecompressBuffer formats in the low 16 bits of State (etl-format.md §1.2, §1.8).
DECOMPRESSORS = {
    2: ("LZNT1", pyfwnt.lznt1_decompress),
    3: ("LZXpress", pyfwnt.lzxpress_decompress),
    4: ("LZXpress-Huffman", pyfwnt.lzxpress_huffman_decompress),
}

# Timestamp offset of the first record by header type (etl-format.md §1.3), to peek a buffer's start.
_TS_OFFSET = {0x01: 16, 0x02: 16, 0x03: 16, 0x04: 16, 0x10: 8, 0x11: 8,
              0x0A: 16, 0x14: 16, 0x0B: 16, 0x15: 16, 0x12: 16, 0x13: 16}


@dataclass
class BufferIndex:
    """One row per buffer, in file order."""

    offset: np.ndarray  # int64 file offset
    size: np.ndarray  # on-disk BufferSize
    filled: np.ndarray  # Offset field: header + data bytes once decompressed
    cpu: np.ndarray
    seq: np.ndarray  # SequenceNumber
    flags: np.ndarray  # BufferFlag
    state: np.ndarray
    first_ts: np.ndarray  # raw timestamp of the first record, int64; min int64 when unknown
    warnings: list[str] = field(default_factory=list)
    trailing_bytes: int = 0
    skipped_bytes: int = 0  # bytes of a buffer cut by the end of the file that are not read

    def __len__(self) -> int:
        return len(self.offset)


class FileBytes:
    """A file read by slices with pread: unlike mmap, what has been read does not stay in the process's
    resident memory, so memory stays proportional to the chunk being decoded, not to the file."""

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, item: slice) -> bytes:
        start, stop, _ = item.indices(self.size)
        return os.pread(self.fd, max(0, stop - start), start)

    def strided(self, start: int, stride: int, count: int, length: int) -> bytes:
        """`length` bytes at each of `start`, `start + stride`, ... (`count` places), joined: one pread each,
        no other Python work per place. Shorter when the file ends first."""
        fd, pread = self.fd, os.pread
        return b"".join([pread(fd, length, o) for o in range(start, start + count * stride, stride)])


class BufferSource:
    """Random access to the decompressed data areas of a file's buffers.

    Every area is checked for records hidden past its filled end (a damaged Offset field, header 0x30):
    such buffers are listed in ``hidden`` as (buffer, bytes, records) for the reader to report."""

    def __init__(self, data: bytes | memoryview, index: BufferIndex):
        self.data = data
        self.index = index
        self.max_area = MAX_BUFFER_DATA  # the reader lowers it to the logger's buffer size once known
        self.hidden: list[tuple[int, int, int]] = []

    def area(self, i: int) -> bytes:
        """Data area of buffer i (records, without the 0x48-byte header), decompressed.
        Raises ValueError when the buffer cannot be decoded."""
        off = int(self.index.offset[i])
        size = int(self.index.size[i])
        filled = int(self.index.filled[i])
        n = filled - BUFFER_HEADER_SIZE
        if self.index.flags[i] & FLAG_COMPRESSED:
            if n > self.max_area:  # the size is read from the file: never allocate more than a buffer holds
                raise ValueError(f"declared size {filled:,} is larger than the logger's buffers "
                                 f"({self.max_area + BUFFER_HEADER_SIZE:,} bytes)")
            # decoded up to the logger's buffer size, not only to the fill size: a stream that holds more says
            # the fill size was shrunk (a bound just past it can fall inside a match that libfwnt then
            # refuses, which hid it: mutation campaign seed 7188); intact streams end at the fill size
            out = self._decompressed(i, n)
            if len(out) > n and self._starts_record(i, out[_align8(n):]):
                self._hide(i, out[_align8(n):])
            return out[:n]
        tail = off + BUFFER_HEADER_SIZE + _align8(n)
        if tail + 0x18 <= off + size and self._starts_record(i, bytes(self.data[tail:tail + _PEEK])):
            self._hide(i, bytes(self.data[tail:off + size]))
        return bytes(self.data[off + BUFFER_HEADER_SIZE: off + filled])

    def read_into(self, i: int, out: np.ndarray) -> int:
        """Write the data area of buffer i into `out` (a uint8 array with room for the area rounded up to 8
        plus 0x20 bytes), zero-padded to 8 bytes; return its length. Uncompressed buffers are read from
        the file straight into `out` (one preadv, no intermediate bytes), with the bytes past the filled
        end checked for hidden records as area() does. Raises ValueError as area() does."""
        n = int(self.index.filled[i]) - BUFFER_HEADER_SIZE
        if self.index.flags[i] & FLAG_COMPRESSED or not isinstance(self.data, FileBytes):
            area = self.area(i)
            out[:n] = np.frombuffer(area, dtype=np.uint8)
        else:
            off = int(self.index.offset[i])
            size = int(self.index.size[i])
            want = min(size - BUFFER_HEADER_SIZE, _align8(n) + _PEEK)
            got = os.preadv(self.data.fd, [memoryview(out[:want])], off + BUFFER_HEADER_SIZE)
            if got < n:
                raise ValueError(f"read {got} of {n} bytes")
            tail = _align8(n)
            if tail + 0x18 <= size - BUFFER_HEADER_SIZE and got >= tail + 0x18 and \
                    self._starts_record(i, out[tail:got].tobytes()):
                self._hide(i, bytes(self.data[off + BUFFER_HEADER_SIZE + tail:off + size]))
        out[n:_align8(n)] = 0
        return n

    def _decompressed(self, i: int, n: int) -> bytes:
        off = int(self.index.offset[i])
        comp = self.data[off + BUFFER_HEADER_SIZE: off + int(self.index.size[i])]
        return decompress(comp, n, int(self.index.state[i]), slack=max(_PEEK, self.max_area - n))

    def check_cut(self, i: int, at: int) -> None:
        """The record walk stopped at byte `at` of buffer i's data area, on a record that runs past the filled
        end or a header cut by it. When the fill size (header 0x30) was shrunk into a record, the complete
        area holds that record and the chain after it: count them with the records hidden past the end.
        Only called for buffers whose walk stopped early, so intact buffers never pay for it."""
        n = int(self.index.filled[i]) - BUFFER_HEADER_SIZE
        try:
            if self.index.flags[i] & FLAG_COMPRESSED:
                data = self._decompressed(i, n)
            else:
                off = int(self.index.offset[i])
                data = bytes(self.data[off + BUFFER_HEADER_SIZE:off + int(self.index.size[i])])
        except ValueError:
            return
        if len(data) > _align8(n) and 0 <= at < _align8(n):
            self._hide(i, data[at:], _align8(n) - at)

    def _starts_record(self, i: int, head: bytes) -> bool:
        """A record header starts right after the filled end, not older than the buffer's first record
        (stale records left from the buffer's previous use would be older)."""
        ts = _first_ts(head)
        if ts is None:
            return False
        known = int(self.index.first_ts[i])
        return known == np.iinfo(np.int64).min or ts >= known

    def _hide(self, i: int, tail: bytes, inside: int = 0) -> None:
        """Count the record chain at the start of `tail` (bytes of buffer i's complete data area) as hidden
        past the filled end, its first `inside` bytes excepted (within the filled end: the walk counts them).
        Records older than the buffer's first record end the chain (stale ones from the buffer's previous
        use); so does anything that is not a record. A chain of one record that is neither followed by the
        end-of-data marker (0xFF) nor ends the area is not proof enough (a damaged record Size)."""
        from pooltrace.etl.records import END, PERFINFO32, PERFINFO64, Chunk, _next_slots, walk

        chunk = Chunk([tail], [0])
        slots, _owner, _problems = walk(chunk)
        if not len(slots) or slots[0] != 0:
            return
        known = int(self.index.first_ts[i])
        if known != np.iinfo(np.int64).min:
            htype = chunk.data[slots * 8 + 2]
            ts = chunk.u64[slots + np.where((htype == PERFINFO32) | (htype == PERFINFO64), 1, 2)].view(np.int64)
            slots = slots[:int(np.argmin(ts >= known)) if (ts < known).any() else len(slots)]
        if not len(slots):
            return
        last = int(slots[-1])
        end = min(int(_next_slots(chunk, last, last + 1)[0]) * 8, len(tail))
        if inside and len(slots) == 1 and end < (len(tail) & ~7) and \
                int(_next_slots(chunk, end // 8, end // 8 + 1)[0]) != END:
            return
        if end > inside:
            self.hidden.append((i, end - inside, len(slots)))


_PEEK = 0x20  # bytes looked at past a buffer's filled end


def _align8(n: int) -> int:
    return (n + 7) & ~7


def decompress(comp: bytes | memoryview, out_size: int, state: int, slack: int = 0, prefix: bool = False) -> bytes:
    """Decompress a buffer's data area to `out_size` bytes (up to `slack` more when the stream holds
    more: a damaged fill size; only the first `out_size` with `prefix`). Output never grows past that
    bound, whatever the stream says."""
    fmt = state & 0xFFFF
    if fmt not in DECOMPRESSORS:
        raise ValueError(f"unknown compression format {fmt} in buffer State")
    name, func = DECOMPRESSORS[fmt]
    try:
        out = func(bytes(comp), out_size + slack)
    except (OSError, ValueError) as exc:
        if fmt != 3:
            raise ValueError(f"{name} data is corrupt ({exc})") from None
        # libfwnt refuses LZXpress matches longer than 32771 bytes, which MS-XCA allows; the pure-Python
        # decoder handles them (rare: only for buffers libfwnt rejects), never writing past out_size.
        try:
            out = xpress.decompress(comp, out_size, prefix=prefix)
        except ValueError as exc2:
            raise ValueError(f"{name} data is corrupt ({exc2})") from None
    if len(out) < out_size:
        raise ValueError(f"{name} data decompressed to {len(out)} bytes, expected {out_size}")
    return out


def _first_ts(head: bytes) -> int | None:
    if len(head) < 24 or head[0:4] == b"\xff\xff\xff\xff":
        return None
    off = _TS_OFFSET.get(head[2])
    if off is None or head[3] & 0xC0 != 0xC0:
        return None
    return struct.unpack_from("<q", head, off)[0]


# A buffer header and the first 32 bytes of its data area, as read for the index (_HDR's fields, then
# 0x38..0x48 unused, then the first record's header).
_HEAD_ROW = np.dtype([("size", "<u4"), ("saved", "<u4"), ("cur", "<u4"), ("ref", "<u4"), ("ts", "<i8"),
                      ("seq", "<u8"), ("clk", "<u8"), ("proc", "<u2"), ("lid", "<u2"), ("state", "<u4"),
                      ("filled", "<u4"), ("flags", "<u2"), ("btype", "<u2"), ("_pad", "V16"),
                      ("rec_marker", "<u4"), ("rec_w1", "<u4"), ("rec_q1", "<i8"), ("rec_q2", "<i8"),
                      ("rec_q3", "<i8")])
_ROW = BUFFER_HEADER_SIZE + 32
_TS_AT = np.zeros(256, dtype=np.uint8)  # _TS_OFFSET as a table: 0 where the header type is unknown
for _t, _o in _TS_OFFSET.items():
    _TS_AT[_t] = _o
# Bytes of a plain LZXpress stream that always hold its first 32 decoded bytes: at most 32 tokens, each at
# most 10 bytes (a match with every length extension), and their two 32-bit flag words: 328 (MS-XCA 2.3).
_XPRESS_HEAD = 512
_FIRST_RUN = 32  # headers read in the first try of a run, doubled while every one fits ...
_MAX_RUN = 1024  # ... up to this many: a damaged header wastes at most this many reads


def _head_rows(data, start: int, stride: int, count: int) -> np.ndarray:
    """The first 0x68 bytes of `count` buffers at `start`, `start + stride`, ... (all inside the file), as
    _HEAD_ROW records: one pread each from a file (no Python work per row beyond the call), or a strided
    view of bytes in memory."""
    if isinstance(data, FileBytes):
        raw = data.strided(start, stride, count, _ROW)
        if len(raw) != count * _ROW:  # the file shrank while it was read: the walk says what is left
            return np.zeros(0, dtype=_HEAD_ROW)
        return np.frombuffer(raw, dtype=_HEAD_ROW)
    whole = np.frombuffer(data, dtype=np.uint8)
    rows = np.lib.stride_tricks.as_strided(whole[start:], shape=(count, _ROW), strides=(stride, 1),
                                           writeable=False)
    return np.ascontiguousarray(rows).view(_HEAD_ROW).reshape(count)


def _even_run(data, start: int, stride: int, count: int) -> dict[str, np.ndarray]:
    """Index rows of the buffers at `start`, `start + stride`, ... that the walk (scan_buffers) would read
    as intact uncompressed buffers of BufferSize `stride`, up to the first that is not (a different size, a
    compressed one, an impossible fill size, a header that is not a buffer's): the same rows, vectorized."""
    h = _head_rows(data, start, stride, count)
    fits = (h["size"] == stride) & (h["flags"] & FLAG_COMPRESSED == 0) & (h["filled"] >= BUFFER_HEADER_SIZE) & \
        (h["filled"] <= stride) & (h["filled"] <= MAX_BUFFER_DATA)
    k = int(np.argmin(fits)) if not fits.all() else len(h)
    h = h[:k]
    # _first_ts of the data area's first min(filled - 0x48, 32) bytes
    htype = ((h["rec_marker"] >> 16) & 0xFF).astype(np.intp)
    at = _TS_AT[htype]
    known = (h["filled"] >= BUFFER_HEADER_SIZE + 24) & (h["rec_marker"] != 0xFFFFFFFF) & (at != 0) & \
        ((h["rec_marker"] >> 24) & 0xC0 == 0xC0)
    ts = np.where(at == 8, h["rec_q1"], h["rec_q2"])
    return {
        "offset": start + stride * np.arange(k, dtype=np.int64), "size": h["size"].astype(np.int64),
        "filled": h["filled"].astype(np.int64), "cpu": (h["proc"] & PROCESSOR_INDEX_MASK).astype(np.int64),
        "seq": h["seq"].astype(np.uint64), "flags": h["flags"].astype(np.int64),
        "state": h["state"].astype(np.int64), "first_ts": np.where(known, ts, np.iinfo(np.int64).min),
    }


_COLUMNS = ("offset", "size", "filled", "cpu", "seq", "flags", "state", "first_ts")
_DTYPES = (np.int64, np.int64, np.int64, np.int64, np.uint64, np.int64, np.int64, np.int64)


def scan_buffers(data: bytes | memoryview, fast: bool = True) -> BufferIndex:
    """Walk the file buffer by buffer. Stops (with a warning) at a header that cannot be stepped over;
    a buffer running past the end of the file is dropped with a warning (truncated file).

    After each intact uncompressed buffer, the buffers that follow at the same spacing are read at once and
    checked vectorized (_even_run): in an uncompressed trace every buffer has the logger's buffer size, so the
    whole index is a few reads of many headers. The walk goes on at the first that does not fit (compressed
    buffers, damage, the end of the file), so the index, warnings and counts are the walk's. `fast=False`
    walks every buffer."""
    n = len(data)
    parts: list[dict[str, np.ndarray]] = []  # runs read at once, with the walked rows between them
    rows: list[tuple] = []
    count = 0  # buffers indexed so far
    warnings: list[str] = []
    off = 0
    trailing = 0
    skipped = 0
    unknown_ts = np.iinfo(np.int64).min
    cool = 0  # buffers to walk before the next try to read many at once
    ahead = BUFFER_HEADER_SIZE + (_XPRESS_HEAD if fast else 32)  # with fast, a compressed buffer's head too
    while off + BUFFER_HEADER_SIZE <= n:
        head_bytes = data[off:off + ahead]
        (bsize, _saved, _cur, _ref, _ts, seq, _clk, proc, _lid, state, filled, flags,
         _btype) = _HDR.unpack_from(head_bytes, 0)
        if bsize == 0 or bsize == 0xFFFFFFFF:
            rest = bytes(data[off:off + 4096])
            if rest.strip(b"\x00") == b"" or rest.strip(b"\xff") == b"":
                trailing = n - off  # preallocated / unused space after the last buffer
                break
        if bsize < BUFFER_HEADER_SIZE:
            warnings.append(f"corrupt buffer header at offset 0x{off:x} (BufferSize {bsize}); "
                            f"stopped reading there, {n - off} bytes skipped")
            break
        if off + bsize > n:
            where = (f"file truncated inside buffer {count} at offset 0x{off:x} "
                     f"({n - off} of {bsize} bytes present)")
            part = _partial(data, off, n - off, filled, flags) if count else None  # never a cut header buffer
            if part is None:
                skipped = n - off
                warnings.append(f"{where}; that buffer was skipped")
            else:
                used, nrec, skipped = part
                warnings.append(f"{where}; the {nrec} complete records present in it were read, "
                                f"{skipped} bytes after them were not")
                ts = _first_ts(bytes(data[off + BUFFER_HEADER_SIZE:off + min(used, BUFFER_HEADER_SIZE + 32)]))
                rows.append((off, n - off, used, proc & PROCESSOR_INDEX_MASK, seq, flags, state,
                             unknown_ts if ts is None else ts))
                count += 1
            break
        compressed = bool(flags & FLAG_COMPRESSED)
        if filled < BUFFER_HEADER_SIZE or (not compressed and filled > bsize) or filled > MAX_BUFFER_DATA:
            warnings.append(f"buffer {count} at offset 0x{off:x} has an impossible fill size {filled}; skipped")
            rows.append((off, bsize, BUFFER_HEADER_SIZE, proc & PROCESSOR_INDEX_MASK, seq, flags, state,
                         unknown_ts))
            count += 1
            off += bsize
            continue
        if compressed:
            head = _compressed_head(data, off, bsize, filled, state, head_bytes if fast else None)
        else:
            head = bytes(head_bytes[BUFFER_HEADER_SIZE:min(filled, BUFFER_HEADER_SIZE + 32)])
        ts = _first_ts(head)
        rows.append((off, bsize, filled, proc & PROCESSOR_INDEX_MASK, seq, flags, state,
                     unknown_ts if ts is None else ts))
        count += 1
        off += bsize
        # an intact uncompressed buffer: read the ones after it at its spacing, as many as fit
        cool -= 1
        if fast and not compressed and bsize >= _ROW and cool <= 0:
            off, added, cool = _runs(data, off, bsize, parts, rows)
            count += added
    if off < n and not trailing and not warnings:
        warnings.append(f"{n - off} bytes after the last buffer ignored")
    if rows or not parts:
        parts.append(_as_columns(rows))
    cols = {c: np.concatenate([p[c] for p in parts]) if len(parts) > 1 else parts[0][c] for c in _COLUMNS}
    return BufferIndex(**cols, warnings=warnings, trailing_bytes=trailing, skipped_bytes=skipped)


def _compressed_head(data, off: int, bsize: int, filled: int, state: int, read: bytes | None) -> bytes:
    """The first 32 bytes (at most) of a compressed buffer's data area, b"" when they cannot be decoded.
    A plain LZXpress stream gives them from its first _XPRESS_HEAD bytes, which `read` (the bytes read from
    the buffer's start) holds: no read of the whole buffer. Any other format, or a stream that needs more
    (never an intact one), is decoded from the whole buffer."""
    want = min(32, filled - BUFFER_HEADER_SIZE)
    if read is not None and state & 0xFFFF == 3 and bsize > len(read) >= BUFFER_HEADER_SIZE + _XPRESS_HEAD:
        try:
            return decompress(read[BUFFER_HEADER_SIZE:], want, state, prefix=True)
        except ValueError:
            pass
    try:
        return decompress(data[off + BUFFER_HEADER_SIZE: off + bsize], want, state, prefix=True)
    except ValueError:
        return b""


def _runs(data, off: int, stride: int, parts: list, rows: list) -> tuple[int, int, int]:
    """Index the buffers from `off` on that are spaced `stride` apart and fit _even_run, in reads of 32,
    64, ... 1024 headers, until one does not fit or the file ends; their rows go to `parts` (after `rows`,
    the walked ones before them, which are moved there). Returns where the walk goes on, the buffers
    indexed, and how many buffers the walk reads before the next try: as many as the headers read in vain
    (past the one that did not fit), so that a file whose spacing keeps changing is never read more than
    twice."""
    ahead = (len(data) - off) // stride
    run = _FIRST_RUN
    added = 0
    while ahead:
        want = min(run, ahead)
        got = _even_run(data, off, stride, want)
        k = len(got["offset"])
        if k:
            if rows:
                parts.append(_as_columns(rows))
                rows.clear()
            parts.append(got)
            off += k * stride
            ahead -= k
            added += k
        if k < want:
            return off, added, want - k - 1
        run = min(2 * run, _MAX_RUN)
    return off, added, 0


def _as_columns(rows: list[tuple]) -> dict[str, np.ndarray]:
    cols = list(zip(*rows, strict=True)) if rows else [()] * len(_COLUMNS)
    return {c: np.array(v, dtype=t) for c, v, t in zip(_COLUMNS, cols, _DTYPES, strict=True)}


def _partial(data, off: int, present: int, filled: int, flags: int) -> tuple[int, int, int] | None:
    """The readable part of an uncompressed buffer cut by the end of the file: (fill size that ends after
    its last complete record, complete records, bytes present in its filled area that are not read), or
    None when nothing can be read safely (compressed data cannot be decoded from a part of its stream)."""
    from pooltrace.etl.records import Chunk, _next_slots, walk

    if flags & FLAG_COMPRESSED or filled < BUFFER_HEADER_SIZE or present <= BUFFER_HEADER_SIZE:
        return None
    end = min(filled, present)
    chunk = Chunk([bytes(data[off + BUFFER_HEADER_SIZE:off + end])], [0])
    slots, _owner, _problems = walk(chunk)
    if not len(slots):
        return None
    after = int(_next_slots(chunk, int(slots[-1]), int(slots[-1]) + 1)[0]) * 8
    used = BUFFER_HEADER_SIZE + min(after, end - BUFFER_HEADER_SIZE)
    return used, len(slots), end - used


def _merge(index: BufferIndex, queued: np.ndarray) -> np.ndarray:
    """The k-way merge of reading_order when a CPU's queue goes back in time (a damaged or unknown first
    timestamp): the heads are taken by (first timestamp, CPU, place in the queue)."""
    queues: dict[int, list[int]] = {}
    for i in queued.tolist():
        queues.setdefault(int(index.cpu[i]), []).append(i)
    heads = [(int(index.first_ts[q[0]]), cpu, 0) for cpu, q in queues.items()]
    heapq.heapify(heads)
    order = []
    while heads:
        _ts, cpu, pos = heapq.heappop(heads)
        q = queues[cpu]
        order.append(q[pos])
        if pos + 1 < len(q):
            heapq.heappush(heads, (int(index.first_ts[q[pos + 1]]), cpu, pos + 1))
    return np.array(order, dtype=np.int64)


def reading_order(index: BufferIndex, skip: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Order in which to read the data buffers (all but the first `skip`): a k-way merge of the
    per-CPU queues (each in SequenceNumber order) by first timestamp.

    Returns (order, watermark): watermark[k] is the smallest first timestamp among buffers read after
    order[k] — every event still to come is at or after it (per-CPU streams never go back in time).
    """
    ids = np.arange(skip, len(index))
    queued = ids[np.lexsort((ids, index.seq[ids], index.cpu[ids]))]  # the per-CPU queues, one after another
    cpu, fts = index.cpu[queued], index.first_ts[queued]
    if not ((cpu[1:] == cpu[:-1]) & (fts[1:] < fts[:-1])).any():
        # every queue in time order (as the logger writes them): the merge is a stable sort by (ts, cpu)
        order_arr = queued[np.lexsort((cpu, fts))].astype(np.int64)
    else:
        order_arr = _merge(index, queued)
    # Watermark after reading order[k] = min first_ts over the buffers not yet read = the min over the
    # per-CPU heads, which the merge order makes the next buffer's first_ts... except that a later
    # CPU's head may be smaller when first_ts is unknown; a suffix minimum covers every case.
    fts = index.first_ts[order_arr] if len(order_arr) else np.zeros(0, dtype=np.int64)
    suffix_min = np.minimum.accumulate(fts[::-1])[::-1] if len(fts) else fts
    watermark = np.empty(len(order_arr), dtype=np.int64)
    if len(order_arr):
        watermark[:-1] = suffix_min[1:]
        watermark[-1] = np.iinfo(np.int64).max
    return order_arr, watermark
