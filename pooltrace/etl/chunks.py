"""Decode one chunk of buffers: read them into one array, walk and decode the records, count them.

This is the reader's unit of work, the same in the reader's own process and in a decode worker
(parallel.py): it depends only on the file, the buffer index and the chunk's buffer list, never on the
chunks before it. Sequence numbers start at 0 in every chunk (the reader shifts them); warnings and counts
come back as data for the reader to add to its statistics in chunk order, so the result does not depend
on where the chunk was decoded.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pooltrace.etl.buffers import BUFFER_HEADER_SIZE, BufferIndex, BufferSource, reading_order
from pooltrace.etl.columns import Columns
from pooltrace.etl.decode import decode_chunk, stack_frames
from pooltrace.etl.fragments import Digest, digest, digest_spans
from pooltrace.etl.records import (
    HEADER_TYPE_NAMES,
    IS_CLASSIC,
    IS_EVENT,
    NOT_VALID,
    RUNS_PAST,
    SLACK,
    Chunk,
    Records,
    decode_headers,
)


@dataclass
class ChunkCounts:
    """What one chunk adds to the reader's statistics."""

    records: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    by_header_type: Counter = field(default_factory=Counter)
    by_hook: Counter = field(default_factory=Counter)
    by_classic: Counter = field(default_factory=Counter)
    by_provider: Counter = field(default_factory=Counter)
    malformed: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)
    bytes_skipped: int = 0
    buffers_skipped: int = 0


@dataclass
class DecodedChunk:
    """Typed tables of one chunk (rows in chunk order, seq from 0), its counts and, when stack frames
    are digested, the stacks table has `frag` (index into `digest`) and `user` instead of `frames`."""

    tables: dict[str, Columns | pa.Table]
    counts: ChunkCounts
    digest: Digest | None = None


def plan_chunks(index: BufferIndex, chunk_bytes: int) -> list[tuple[list[int], int]]:
    """The reader's units of work, as (buffers, watermark): the first buffer (the logfile header) alone,
    then the others in reading order (buffers.reading_order) in groups of at least `chunk_bytes` filled
    bytes (the last one smaller), each with the watermark after its last buffer: every event read after
    the group is at or after it."""
    order, watermark = reading_order(index, skip=1)
    first_wm = int(index.first_ts[order].min()) if len(order) else np.iinfo(np.int64).max
    plan: list[tuple[list[int], int]] = [([0], first_wm)]
    upto = np.cumsum(index.filled[order])  # filled bytes up to each buffer in reading order, increasing
    start = 0
    while start < len(order):
        before = int(upto[start - 1]) if start else 0
        end = min(max(int(np.searchsorted(upto, before + chunk_bytes, side="left")), start), len(order) - 1)
        plan.append((order[start:end + 1].tolist(), int(watermark[end])))
        start = end + 1
    return plan


def _guid_str(lo: int, hi: int) -> str:
    return str(uuid.UUID(bytes_le=int(lo).to_bytes(8, "little") + int(hi).to_bytes(8, "little")))


def read_chunk(source: BufferSource, index: BufferIndex, buffers: list[int],
               counts: ChunkCounts) -> tuple[Chunk, list[int]] | None:
    """The chunk's data areas read into one array; buffers that cannot be read are skipped and counted.
    Returns the chunk and the buffers in it, or None when none could be read."""
    room = (index.filled[buffers] - BUFFER_HEADER_SIZE + 7) & ~7
    data = np.empty(int(room.sum()) + SLACK + 0x20, dtype=np.uint8)  # read into; 0x20 for the peek past the end
    starts, ends, cpus, kept = [], [], [], []
    pos = 0
    for b in buffers:
        try:
            n = source.read_into(b, data[pos:])
        except ValueError as exc:
            counts.buffers_skipped += 1
            counts.bytes_skipped += int(index.size[b])
            counts.warnings.append(f"buffer {b} at offset 0x{int(index.offset[b]):x} skipped: {exc}")
            continue
        starts.append(pos)
        ends.append(pos + n)
        cpus.append(int(index.cpu[b]))
        kept.append(b)
        pos += (n + 7) & ~7
    _say_hidden(source, index, counts)
    if not kept:
        return None
    data[pos:] = 0
    return Chunk.from_array(data[:pos + SLACK], starts, ends, cpus), kept


def _say_hidden(source: BufferSource, index: BufferIndex, counts: ChunkCounts) -> None:
    for b, nbytes, nrec in source.hidden:
        counts.bytes_skipped += nbytes
        counts.warnings.append(f"buffer {b} at offset 0x{int(index.offset[b]):x} is damaged: {nrec} records "
                               f"({nbytes} bytes) follow the end its header gives (filled size "
                               f"{int(index.filled[b])}); they were not read")
    source.hidden.clear()


def decode_buffers(source: BufferSource, index: BufferIndex, buffers: list[int], user_limit: int | None = None,
                   digest_stacks: bool = False) -> DecodedChunk:
    """Read and decode the chunk made of `buffers` (in reading order)."""
    counts = ChunkCounts()
    read = read_chunk(source, index, buffers, counts)
    if read is None:
        return DecodedChunk({}, counts)
    chunk, kept = read
    recs, problems, dropped = decode_headers(chunk)
    for k, nbytes, reason in problems:
        counts.bytes_skipped += nbytes
        tail = "" if reason.endswith("not read") else f"; last {nbytes} bytes skipped"
        counts.warnings.append(f"buffer {kept[k]} (cpu {int(chunk.cpus[k])}): {reason}{tail}")
        if reason in (NOT_VALID, RUNS_PAST):  # a fill size shrunk into a record: the records after it
            n = int(index.filled[kept[k]]) - BUFFER_HEADER_SIZE
            source.check_cut(kept[k], ((n + 7) & ~7) - nbytes)
    _say_hidden(source, index, counts)
    if dropped:  # a record lost is damage, said as a warning, not only counted
        counts.malformed["record header"] += dropped
        where = f"buffer {kept[0]}" if len(kept) == 1 else f"buffers {min(kept)}..{max(kept)}"
        counts.warnings.append(f"{dropped} record(s) dropped in {where}: header and payload sizes disagree "
                               "(damaged record header)")
    count_records(recs, counts)
    dec = decode_chunk(chunk, recs, 0, frame_spans=digest_stacks)
    counts.malformed.update(dec.malformed)
    stacks = dec.tables.get("stacks")
    dig = None
    if digest_stacks and stacks is not None:
        at, n, ptr = (stacks.cols.pop(k) for k in ("frame_at", "frame_n", "frame_ptr"))
        if not (ptr != 8).any() and not (at & 7).any():  # x64: hashed where they lie, no frame array
            words = chunk.u64
            dig = digest_spans(words, at >> 3, n)
            first = words[at >> 3]
        else:
            offsets, values = stack_frames(chunk, at, n, ptr)
            dig = digest(values, offsets)
            first = values[offsets[:-1]]
        stacks.cols["frag"] = dig.inverse
        dig.inverse = None  # travels once, as the stacks column
        stacks.cols["user"] = first < np.uint64(user_limit)
    return DecodedChunk(dec.tables, counts, dig)


def count_records(recs: Records, counts: ChunkCounts) -> None:
    """Records by header type, kernel hook, classic class/opcode and EVENT_HEADER provider; time span."""
    counts.records += len(recs)
    if not len(recs):
        return
    counts.first_ts, counts.last_ts = int(recs.ts.min()), int(recs.ts.max())
    n = np.bincount(recs.htype, minlength=256)  # header types are bytes, hooks 16-bit: count, no sort
    for t in np.flatnonzero(n).tolist():
        counts.by_header_type[HEADER_TYPE_NAMES.get(t, f"0x{t:02x}")] += int(n[t])
    hooks = recs.hook[recs.hook >= 0]
    if len(hooks):
        c = np.bincount(hooks)
        h = np.flatnonzero(c)
        counts.by_hook.update(dict(zip(h.tolist(), c[h].tolist(), strict=True)))
    classic = IS_CLASSIC[recs.htype]
    if classic.any():
        keys = np.column_stack([recs.guid[classic], recs.opcode[classic].astype(np.uint64)])
        u, c = np.unique(keys, axis=0, return_counts=True)
        for (lo, hi, op), k in zip(u.tolist(), c.tolist(), strict=True):
            counts.by_classic[(_guid_str(lo, hi), int(op))] += k
    event = IS_EVENT[recs.htype]
    if event.any():
        u, c = np.unique(recs.guid[event], axis=0, return_counts=True)
        for (lo, hi), k in zip(u.tolist(), c.tolist(), strict=True):
            counts.by_provider[_guid_str(lo, hi)] += k
