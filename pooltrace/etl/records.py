"""Record layer: find every record in a chunk of decompressed buffers and decode the record headers,
vectorized over the chunk.

Records are 8-byte aligned (etl-format.md §1.3), so the chunk is viewed as 8-byte slots. For every slot
numpy computes where the next record would start if a record started there; a short Python loop then
follows that chain from each buffer's first slot. Everything else (header type, hook id, timestamp,
thread/process, payload position) is gathered with numpy, so no Python object is made per record.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

import numpy as np

# Header types (etl-format.md §1.3).
SYSTEM32, SYSTEM64, COMPACT32, COMPACT64 = 0x01, 0x02, 0x03, 0x04
PERFINFO32, PERFINFO64 = 0x10, 0x11
EVENT32, EVENT64 = 0x12, 0x13
FULL32, FULL64 = 0x0A, 0x14
INSTANCE32, INSTANCE64 = 0x0B, 0x15
MESSAGE = 0xFE  # pseudo type for WPP TRACE_MESSAGE records (marker flags 0x90..)

HEADER_TYPE_NAMES = {
    SYSTEM32: "SYSTEM32", SYSTEM64: "SYSTEM64", COMPACT32: "COMPACT32", COMPACT64: "COMPACT64",
    PERFINFO32: "PERFINFO32", PERFINFO64: "PERFINFO64", EVENT32: "EVENT_HEADER32", EVENT64: "EVENT_HEADER64",
    FULL32: "FULL_HEADER32", FULL64: "FULL_HEADER64", INSTANCE32: "INSTANCE32", INSTANCE64: "INSTANCE64",
    MESSAGE: "MESSAGE",
}

_HEADER_LEN = {SYSTEM32: 0x20, SYSTEM64: 0x20, COMPACT32: 0x18, COMPACT64: 0x18, PERFINFO32: 0x10,
               PERFINFO64: 0x10, EVENT32: 0x50, EVENT64: 0x50, FULL32: 0x30, FULL64: 0x30,
               INSTANCE32: 0x48, INSTANCE64: 0x48}
_POINTER64 = {SYSTEM64, COMPACT64, PERFINFO64, EVENT64, FULL64, INSTANCE64}
SYSTEM_LIKE = (SYSTEM32, SYSTEM64, COMPACT32, COMPACT64, PERFINFO32, PERFINFO64)
CLASSIC = (FULL32, FULL64, INSTANCE32, INSTANCE64)
EVENT = (EVENT32, EVENT64)

HEADER_LEN_LUT = np.zeros(256, dtype=np.int64)
SYSLIKE_LUT = np.zeros(256, dtype=bool)
PTR_LUT = np.zeros(256, dtype=np.int64)
HAS_TID_LUT = np.zeros(256, dtype=bool)
for _t, _n in _HEADER_LEN.items():
    HEADER_LEN_LUT[_t] = _n
    PTR_LUT[_t] = 8 if _t in _POINTER64 else 4
    HAS_TID_LUT[_t] = _t not in (PERFINFO32, PERFINFO64)
SYSLIKE_LUT[list(SYSTEM_LIKE)] = True
IS_CLASSIC = np.zeros(256, dtype=bool)
IS_CLASSIC[list(CLASSIC)] = True
IS_EVENT = np.zeros(256, dtype=bool)
IS_EVENT[list(EVENT)] = True

END = np.int64(2**62)  # next-slot value of a 0xFFFFFFFF end-of-buffer marker
BAD = np.int64(2**62 + 1)  # next-slot value of a slot that cannot start a record
NO_ID = 0xFFFFFFFF
# why a buffer's record walk stopped before its filled end (the last bytes are then not read)
NOT_VALID, RUNS_PAST = "record header not valid", "record runs past the buffer's filled end"
# an end-of-buffer marker (0xFFFFFFFF) where a record should start, with bytes other than 0xFF after it inside
# the filled area: no real trace (shipped or in etl-samples) has one; a damaged record (a size, or a flipped bit
# in a compressed buffer's stream) made the walk land on it (mutation campaign seed 101447)
DATA_AFTER_END = "end-of-buffer marker before the filled end, with data after it"

_EXT_ITEM = struct.Struct("<HHHH")


@dataclass
class Records:
    """Decoded record headers of one chunk, one entry per record, in chunk (per-CPU time) order."""

    pos: np.ndarray  # byte offset of the record in the chunk
    htype: np.ndarray  # header type (uint8 values)
    size: np.ndarray  # record Size (without padding)
    hook: np.ndarray  # HookId for SYSTEM/COMPACT/PERFINFO records, -1 otherwise
    version: np.ndarray  # event version: marker version bits without the PMC/PEBS flags; classic/EVENT version
    ts: np.ndarray  # raw timestamp, int64
    tid: np.ndarray  # uint32, NO_ID when the header has none
    pid: np.ndarray
    pointer_size: np.ndarray  # 4 or 8, from the header type
    payload: np.ndarray  # byte offset of the payload in the chunk
    payload_len: np.ndarray
    cpu: np.ndarray
    opcode: np.ndarray  # classic Class.Type / EVENT_DESCRIPTOR.Opcode, -1 for kernel records
    guid: np.ndarray  # (n, 2) uint64 halves of the provider/class GUID (little-endian bytes), 0 for kernel

    def __len__(self) -> int:
        return len(self.pos)


SLACK = 0x60  # zero bytes after the last area, so fixed-size header reads never run off the end


class Chunk:
    """Decompressed data areas of several buffers, each starting on an 8-byte boundary."""

    def __init__(self, areas: list[bytes], cpus: list[int]):
        parts = []
        starts = []
        pos = 0
        for a in areas:
            starts.append(pos)
            pad = -len(a) % 8
            parts.append(a)
            if pad:
                parts.append(b"\x00" * pad)
            pos += len(a) + pad
        parts.append(b"\x00" * SLACK)
        self._set(np.frombuffer(b"".join(parts), dtype=np.uint8), starts,
                  [s + len(a) for s, a in zip(starts, areas, strict=True)], cpus)

    @classmethod
    def from_array(cls, data: np.ndarray, starts: list[int], ends: list[int], cpus: list[int]) -> Chunk:
        """A chunk over areas already laid out in `data` (8-aligned starts, zero padding, SLACK zero
        bytes after the last area; len(data) a multiple of 8)."""
        chunk = cls.__new__(cls)
        chunk._set(data, starts, ends, cpus)
        return chunk

    def _set(self, data: np.ndarray, starts, ends, cpus) -> None:
        self.data = data
        self.starts = np.array(starts, dtype=np.int64)
        self.ends = np.array(ends, dtype=np.int64)
        self.cpus = np.array(cpus, dtype=np.int64)
        self.u16 = self.data.view("<u2")
        self.u32 = self.data.view("<u4")
        self.u64 = self.data.view("<u8")


def _marker_tables() -> tuple[np.ndarray, np.ndarray]:
    """Per value of a record's second u16 (header type | flags << 8): where its size is and the smallest
    valid size. Kind 0 invalid, 1 size at +4 (SYSTEM/COMPACT/PERFINFO), 2 size at +0 (other headers),
    3 WPP message (size at +0), 4 the 0xFFFF end-of-buffer marker."""
    w1 = np.arange(65536)
    htype, flags = w1 & 0xFF, w1 >> 8
    hlen = HEADER_LEN_LUT[htype]
    kind = np.where(((flags & 0xC0) == 0xC0) & (hlen > 0), np.where(SYSLIKE_LUT[htype], 1, 2), 0)
    message = (flags & 0xD0) == 0x90
    kind = np.where(message, 3, kind)
    hlen = np.where(message, 8, hlen)
    kind[0xFFFF] = 4
    return kind.astype(np.uint8), hlen.astype(np.uint16)


MARKER_KIND, MARKER_MIN_SIZE = _marker_tables()


def _next_slots(chunk: Chunk, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """For every 8-byte slot in [lo, hi): the slot where the next record starts if one starts there,
    END or BAD (indexed from lo)."""
    w = chunk.u16.reshape(-1, 4)[lo:hi]
    w1 = w[:, 1]
    kind = MARKER_KIND[w1]
    size = np.where(kind == 1, w[:, 2], w[:, 0])
    nxt = np.arange(lo, lo + len(w), dtype=np.int64)
    nxt += (size.astype(np.int64) + 7) >> 3
    nxt[(kind == 0) | (size < MARKER_MIN_SIZE[w1])] = BAD
    nxt[kind == 4] = END
    return nxt


_FLAGS_BYTE, _FLAGS_C0 = np.uint64(0xFF000000), np.uint64(0xC0000000)  # byte 3 of a slot read as a u64


def _likely_starts(chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
    """Slots that look like record starts under a strict test, and where the next record would start.

    The test — flags byte exactly 0xC0, a SYSTEM/COMPACT/PERFINFO/classic/EVENT header type, a size at
    least the header's; for kernel headers a small version and a known hook group — is first run on the
    flags byte alone (one byte per slot), then on the few slots that pass. Payload bytes almost never
    pass it, so in most buffers these slots are exactly the record chain; walk() proves that."""
    cand = np.flatnonzero((chunk.u64 & _FLAGS_BYTE) == _FLAGS_C0)
    h16 = chunk.u64[cand].view(np.uint16).reshape(len(cand), 4)  # each candidate's first 8 bytes, as 4 words
    w0, w1 = h16[:, 0], h16[:, 1]
    kind = MARKER_KIND[w1]
    kernel = kind == 1
    size = np.where(kernel, h16[:, 2], w0).astype(np.int64)
    ok = (kernel | (kind == 2)) & (size >= MARKER_MIN_SIZE[w1])
    ok &= ~kernel | (((w0 & 0x78FF) < 16) & ((h16[:, 3] >> 8) < 0x40))
    cand = cand[ok]
    return cand, cand + ((size[ok] + 7) >> 3)


def walk(chunk: Chunk) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, str]]]:
    """Slots of every record, the index of the buffer (within the chunk) each belongs to, and the
    problems met: (buffer number in chunk, bytes skipped, reason).

    Fast path, per buffer: the likely starts form one chain from the buffer's first slot to its end
    (each one's next slot is the following one), which proves they are exactly the records. Otherwise
    that buffer's chain is followed record by record."""
    starts = chunk.starts >> 3
    ends = (chunk.ends + 7) >> 3
    cand, nxt_c = _likely_starts(chunk)
    lo = np.searchsorted(cand, starts)
    hi = np.searchsorted(cand, ends)
    n = hi - lo
    fast = n > 0
    if len(cand):
        linked = nxt_c[:-1] == cand[1:]
        broken = np.concatenate([[0], np.cumsum(~linked)])  # broken links before each candidate
        first = np.minimum(lo, len(cand) - 1)
        last = np.maximum(hi - 1, 0)
        fast &= cand[first] == starts
        fast &= broken[last] - broken[first] == 0
        fast &= nxt_c[last] == ends
        if fast.all() and (lo[1:] == hi[:-1]).all():  # every buffer proven (the usual case): no loop
            return cand[lo[0]:hi[-1]], np.repeat(np.arange(len(n), dtype=np.int64), n), []
    parts = []
    counts = []
    problems = []
    for k, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        if fast[k]:
            parts.append(cand[lo[k]:hi[k]])
            counts.append(int(n[k]))
            continue
        nx = memoryview(_next_slots(chunk, s, e))
        out = array("q")
        app = out.append
        p = s
        while p < e:
            q = nx[p - s]
            if q > e:
                break
            app(p)
            p = q
        else:
            q = None
        chain = np.frombuffer(out, dtype=np.int64) if len(out) else np.zeros(0, dtype=np.int64)
        parts.append(chain)
        counts.append(len(out))
        problems.extend((k, nbytes, reason) for nbytes, reason in _swallowed(chain, p, cand, nx, s, e))
        if p < e and q != END:
            reason = NOT_VALID if q == BAD else RUNS_PAST
            problems.append((k, (e - p) * 8, reason))
        elif p < e and (chunk.data[p * 8:int(chunk.ends[k])] != 0xFF).any():
            problems.append((k, int(chunk.ends[k]) - p * 8, DATA_AFTER_END))
    slots = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    owner = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    return slots, owner, problems


def _swallowed(chain: np.ndarray, stop: int, cand: np.ndarray, nx: memoryview, s: int,
               e: int) -> list[tuple[int, str]]:
    """Records hidden inside a record whose Size was damaged upward (mutation campaign seed 2781): a
    likely record start inside the record whose own chain lands exactly where the walk went on (or on a
    later record of it) proves that the record's size runs over valid records. Only buffers the fast path
    could not prove are checked, and only records that contain a likely start. Returns (bytes, reason)."""
    if not len(chain) or not len(cand):
        return []
    after = np.append(chain[1:], stop)
    first = np.searchsorted(cand, chain + 1)
    suspect = np.flatnonzero(first < np.searchsorted(cand, after))
    found = []
    for j in suspect.tolist():
        q = int(after[j])
        for c in cand[first[j]:first[j] + 4].tolist():  # a few candidates: payload bytes rarely pass
            if c >= q:
                break
            x, n = c, 0
            while x < q:
                n += 1
                x = nx[x - s]
                if x > e:  # END, BAD or past the filled end: not a record chain
                    break
            # the hidden chain ends where the walk went on, or (the walk having landed inside one of its
            # records) on a later record of the walk; then at least two records, as one candidate that
            # straddles the walk's next record is only a payload coincidence
            if x > e or (x != q and x != e and (n < 2 or not _on_chain(chain, x))):
                continue
            size = (q - int(chain[j])) * 8
            found.append(((q - c) * 8, f"a record's size ({size} bytes, at offset 0x{(int(chain[j]) - s) * 8:x}) "
                                       f"runs over {n} valid record(s) ({(q - c) * 8} bytes) that follow it "
                                       "(damaged record header); they were not read"))
            break
    return found


def _on_chain(chain: np.ndarray, x: int) -> bool:
    i = int(np.searchsorted(chain, x))
    return i < len(chain) and int(chain[i]) == x


def _walk_slow(chunk: Chunk) -> np.ndarray:
    """Reference walk, record by record, for tests."""
    nxt = _next_slots(chunk)
    out = []
    for s8, e8 in zip(chunk.starts.tolist(), chunk.ends.tolist(), strict=True):
        p, e = s8 >> 3, (e8 + 7) >> 3
        while p < e and nxt[p] <= e:
            out.append(p)
            p = int(nxt[p])
    return np.array(out, dtype=np.int64)


def decode_headers(chunk: Chunk) -> tuple[Records, list[tuple[int, int, str]], int]:
    """Decode every record header of the chunk. Returns the records, the walk problems and the number
    of records dropped because their header and payload sizes disagree.

    Nearly all records of a pool trace have a SYSTEM/COMPACT/PERFINFO header: their fields are computed for
    every record from the header's first three 8-byte slots (three gathers, then arithmetic on them); the
    other records (classic, EVENT_HEADER, WPP messages) are decoded again by _other_headers and replace them."""
    slots, owner, problems = walk(chunk)
    n = len(slots)
    pos = slots * 8
    head = chunk.u64[slots]  # bytes 0-7: version/size words, header type, flags, hook
    h16 = head.view(np.uint16).reshape(n, 4)
    h8 = head.view(np.uint8).reshape(n, 8)
    htype = h8[:, 2].astype(np.int64)
    w0 = h16[:, 0].astype(np.int64)
    size = h16[:, 2].astype(np.int64)
    hook = h16[:, 3].astype(np.int64)
    # PMC counters (bits 8-10, 8 bytes each) and a PEBS index (bit 15) sit between header and payload.
    hlen = HEADER_LEN_LUT[htype] + (((w0 >> 5) & 0x38) + ((w0 >> 12) & 8))
    version = w0 & 0x78FF
    second, third = chunk.u64[slots + 1], chunk.u64[slots + 2]
    perfinfo = (htype | 1) == PERFINFO64  # PERFINFO headers: timestamp in slot 1, no thread/process
    ts = np.where(perfinfo, second, third).view(np.int64)
    ids = second.view(np.uint32).reshape(n, 2)
    tid = np.where(perfinfo, np.uint32(NO_ID), ids[:, 0])
    pid = np.where(perfinfo, np.uint32(NO_ID), ids[:, 1])
    opcode = np.full(n, -1, dtype=np.int64)
    guid = np.zeros((n, 2), dtype=np.uint64)
    message = None
    other = np.flatnonzero(~SYSLIKE_LUT[htype] | ((h8[:, 3] & 0xD0) == 0x90))
    if len(other):
        message = np.zeros(n, dtype=bool)
        (htype[other], size[other], hook[other], version[other], ts[other], tid[other], pid[other], hlen[other],
         opcode[other], guid[other], message[other]) = _other_headers(chunk, slots[other])
    plen = size - hlen
    good = plen >= 0
    if message is not None:
        good |= message
    dropped = n - int(np.count_nonzero(good))
    if dropped:
        keep = np.flatnonzero(good)
        pos, htype, size, hook, version, ts, tid, pid, hlen, plen, opcode, guid, owner = (
            a[keep] for a in (pos, htype, size, hook, version, ts, tid, pid, hlen, plen, opcode, guid, owner))
        if message is not None:
            message = message[keep]
    if message is not None and message.any():
        plen = np.where(message, 0, plen)
    recs = Records(
        pos=pos, htype=htype, size=size, hook=hook, version=version, ts=ts, tid=tid, pid=pid,
        pointer_size=PTR_LUT[htype], payload=pos + hlen, payload_len=plen, cpu=chunk.cpus[owner], opcode=opcode,
        guid=guid,
    )
    return recs, problems, dropped


def _other_headers(chunk: Chunk, slots: np.ndarray) -> tuple[np.ndarray, ...]:
    """Header fields of any records (decode_headers uses it for those without a SYSTEM/COMPACT/PERFINFO
    header): htype, size, hook, version, ts, tid, pid, header length, opcode, guid and whether each is a
    WPP message (whose size is at +0 and whose payload is empty)."""
    pos = slots * 8
    b = chunk.data
    htype = b[pos + 2].astype(np.int64)
    syslike = SYSLIKE_LUT[htype]
    w0 = chunk.u16[slots * 4]
    size = np.where(syslike, chunk.u16[slots * 4 + 2], w0).astype(np.int64)
    message = (b[pos + 3] & 0xD0) == 0x90
    htype = np.where(message, MESSAGE, htype)
    size = np.where(message, w0, size)
    hook = np.where(syslike, chunk.u16[slots * 4 + 3].astype(np.int64), -1)
    ext = np.where(syslike, ((w0 >> 8) & 7).astype(np.int64) + ((w0 >> 15) & 1), 0)
    version = np.where(syslike, w0 & 0x78FF, 0).astype(np.int64)
    hlen = HEADER_LEN_LUT[htype] + 8 * ext
    ts_slot = np.where((htype == PERFINFO32) | (htype == PERFINFO64), 1, 2)
    ts = chunk.u64[slots + ts_slot].view(np.int64)
    has_tid = HAS_TID_LUT[htype] & ~message
    tid = np.where(has_tid, chunk.u32[slots * 2 + 2], NO_ID).astype(np.uint32)
    pid = np.where(has_tid, chunk.u32[slots * 2 + 3], NO_ID).astype(np.uint32)
    classic = IS_CLASSIC[htype]
    event = IS_EVENT[htype]
    opcode = np.where(classic, b[pos + 4].astype(np.int64), np.where(event, b[pos + 0x2D].astype(np.int64), -1))
    version = np.where(classic, chunk.u16[slots * 4 + 3], np.where(event, b[pos + 0x2A], version)).astype(np.int64)
    g = classic | event
    guid = np.zeros((len(slots), 2), dtype=np.uint64)
    guid[g, 0] = chunk.u64[slots[g] + 3]
    guid[g, 1] = chunk.u64[slots[g] + 4]
    # EVENT_HEADER extended data items (etl-format.md §1.4): follow the Linkage bit to the user data.
    if event.any():
        flags16 = chunk.u16[slots * 4 + 2]  # EVENT_HEADER.Flags at +4
        raw = chunk.data
        for i in np.flatnonzero(event & (flags16 & 1).astype(bool)).tolist():
            p = int(pos[i]) + 0x50
            end = int(pos[i]) + int(size[i])
            while p + 8 <= end:
                isize, _etype, link, _dsize = _EXT_ITEM.unpack_from(raw, p)
                if isize < 8:
                    p = end + 1  # malformed: dropped below
                    break
                p += isize
                if not link & 1:
                    break
            hlen[i] = p - int(pos[i])
    return htype, size, hook, version, ts, tid, pid, hlen, opcode, guid, message
