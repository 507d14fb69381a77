"""Kernel event decoders: turn the records of a chunk into typed Arrow tables.

Pool and StackWalk events, which make up nearly all of a pool trace, are decoded column-wise with
numpy from the layouts in providers/kernel.toml. The rare events (images, processes, threads,
KernelTraceControl, header extension, pool snapshots) are decoded one by one with ``struct`` from the
same layouts.
Records with no decoder are skipped, never guessed; records too short for their layout are counted.
"""

from __future__ import annotations

import struct
import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pooltrace.definitions import FIXED_TYPES, Layout, definitions
from pooltrace.etl.columns import Columns
from pooltrace.etl.records import IS_CLASSIC, Chunk, Records

MAX_FRAMES = 192  # ETW_STACK_SW_ARRAY_SIZE (etl-format.md §2.2)

D = definitions()
H = D.hooks
POOL_HOOKS = np.array(D.layout_hooks("pool") + D.layout_hooks("pool_session"))
SESSION_HOOKS = np.array(D.layout_hooks("pool_session"))
STACK_HOOK = H["Stack"]
KEY_REF_HOOKS = np.array(D.layout_hooks("stack_key_ref"))
KEY_DEF_HOOKS = np.array(D.layout_hooks("stack_key_def"))
RARE_LAYOUTS = {h: name for name in ("image", "process", "thread", "header_extension", "kernel_base")
                for h in D.layout_hooks(name)}
KTC_GUID = D.guids["KernelTraceControl"]
KTC_GUID_HALVES = np.frombuffer(KTC_GUID.bytes_le, dtype="<u8")
KTC_LAYOUTS = {D.ktc_opcodes[op]: name for name in ("ktc_image_id", "ktc_rsds")
               for op in D.layout_specs[name]["ktc_opcodes"]}

def _hook_set(hooks) -> np.ndarray:
    """A 64K lookup table: membership of a HookId (records without one carry -1, i.e. 0xFFFF here)."""
    lut = np.zeros(65536, dtype=bool)
    lut[np.asarray(list(hooks), dtype=np.int64)] = True
    return lut


IS_POOL = _hook_set(POOL_HOOKS.tolist())
IS_SESSION = _hook_set(SESSION_HOOKS.tolist())
IS_ALLOC = _hook_set([H["PoolAlloc"], H["PoolAllocSession"]])
IS_KEY_REF = _hook_set(KEY_REF_HOOKS.tolist())
IS_KEY_DEF = _hook_set(KEY_DEF_HOOKS.tolist())
IS_RARE = _hook_set(RARE_LAYOUTS)


def in_set(lut: np.ndarray, hooks: np.ndarray) -> np.ndarray:
    return lut[hooks & 0xFFFF]


_U = {1: ("data", np.uint8), 2: ("u16", np.uint16), 4: ("u32", np.uint32), 8: ("u64", np.uint64)}
_SHIFT = {1: 0, 2: 1, 4: 2, 8: 3}


def gather(chunk: Chunk, offsets: np.ndarray, size: int) -> np.ndarray:
    """Little-endian unsigned integers of `size` bytes at byte `offsets` of the chunk."""
    view, dtype = _U[size]
    if len(offsets) == 0:
        return np.zeros(0, dtype=dtype)
    if size == 1 or not (offsets & (size - 1)).any():
        return getattr(chunk, view)[offsets >> _SHIFT[size]].astype(dtype, copy=False)
    out = np.zeros(len(offsets), dtype=np.uint64)
    for k in range(size):  # unaligned: assemble byte by byte
        out |= chunk.data[offsets + k].astype(np.uint64) << np.uint64(8 * k)
    return out.astype(dtype)


def _field(chunk: Chunk, base: np.ndarray, layout: Layout, name: str) -> np.ndarray:
    f = layout.field(name)
    size = layout.pointer_size if f.type == "ptr" else f.size
    return gather(chunk, base + f.offset, size)


def _fields(chunk: Chunk, base: np.ndarray, layout: Layout, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Fields `names` of the payloads at byte offsets `base`, as gather() reads them. When every payload
    starts on 8 bytes (kernel headers are multiples of 8 long) and every field lies at a multiple of its size,
    the 8-byte words that hold them are gathered once per record and each field is read from those rows:
    one random access per word instead of one per field. Reads up to 7 bytes past the last field, which
    SLACK covers at the end of a chunk."""
    fields = [layout.field(n) for n in names]
    sizes = [layout.pointer_size if f.type == "ptr" else f.size for f in fields]
    if not len(base) or (base & 7).any() or any(f.offset % s for f, s in zip(fields, sizes, strict=True)):
        return {n: gather(chunk, base + f.offset, s) for n, f, s in zip(names, fields, sizes, strict=True)}
    words = (max(f.offset + s for f, s in zip(fields, sizes, strict=True)) + 7) >> 3
    rows = chunk.u64[(base >> 3)[:, None] + np.arange(words)]
    return {n: np.ascontiguousarray(rows.view(_U[s][1])[:, f.offset // s])
            for n, f, s in zip(names, fields, sizes, strict=True)}


def _select(recs: Records, lut: np.ndarray) -> np.ndarray:
    """Indices of the records whose HookId is in a _hook_set table (records without one never are)."""
    hooks = getattr(recs, "_hook16", None)
    if hooks is None:  # computed once per chunk, for every decoder: -1 (no HookId) becomes 0xFFFF
        hooks = recs._hook16 = (recs.hook & 0xFFFF).astype(np.uint16)
    return np.flatnonzero(lut[hooks])


def _common(recs: Records, idx: np.ndarray, seq0: int) -> dict[str, np.ndarray]:
    return {"ts": recs.ts[idx], "cpu": recs.cpu[idx].astype(np.uint16), "seq": seq0 + idx}


def _frames(chunk: Chunk, start: np.ndarray, count: np.ndarray, ptr: int) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length frame arrays as (offsets, values)."""
    offsets = np.zeros(len(count) + 1, dtype=np.int64)
    np.cumsum(count, out=offsets[1:])
    total = int(offsets[-1])
    if ptr == 8 and not (start & 7).any():  # aligned (always, for x64 StackWalk): one index per frame
        idx = np.arange(total, dtype=np.int64)
        idx += np.repeat((start >> 3) - offsets[:-1], count)
        return offsets, chunk.u64[idx]
    within = np.arange(total, dtype=np.int64) - np.repeat(offsets[:-1], count)
    addr = np.repeat(start, count) + within * ptr
    return offsets, gather(chunk, addr, ptr).astype(np.uint64, copy=False)


@dataclass
class Decoded:
    """Typed tables of one chunk (rows in chunk order) and what could not be decoded."""

    tables: dict[str, pa.Table | Columns]
    malformed: Counter = field(default_factory=Counter)


def _per_pointer_size(recs: Records, idx: np.ndarray):
    """The records `idx` split by pointer size: the 8-byte ones, then the 4-byte ones (others never)."""
    if not len(idx):
        return
    ptr = recs.pointer_size[idx]
    if ptr[0] == 8 and (ptr == 8).all():
        yield 8, idx
        return
    for size in (8, 4):
        part = idx[ptr == size]
        if len(part):
            yield size, part


def _columns(parts: list[dict], valid: list[dict] | None = None, lists: str | None = None) -> Columns | None:
    """Per-pointer-size parts of one decoder into one Columns (a `lists` entry holds (offsets, values))."""
    if not parts:
        return None
    cols = []
    for k, p in enumerate(parts):
        plain = {n: v for n, v in p.items() if n != lists}
        cols.append(Columns(plain, valid[k] if valid else {}, {lists: p[lists]} if lists else {}))
    return Columns.concat(cols)


def decode_pool(chunk: Chunk, recs: Records, seq0: int, malformed: Counter) -> Columns | None:
    parts, valid = [], []
    for ptr, idx in _per_pointer_size(recs, _select(recs, IS_POOL)):
        hook = recs.hook[idx]
        session = IS_SESSION[hook]
        need = np.where(session, D.layout("pool_session", ptr).fixed_size, D.layout("pool", ptr).fixed_size)
        short = recs.payload_len[idx] < need
        if short.any():
            malformed["pool"] += int(short.sum())
            idx, session, hook = idx[~short], session[~short], hook[~short]
        lay = D.layout("pool_session", ptr)
        f = _fields(chunk, recs.payload[idx], lay, ("pool_type", "tag", "size", "entry", "session_id"))
        col = _common(recs, idx, seq0)
        col["hook"] = hook.astype(np.uint16)
        for name in ("pool_type", "tag", "size", "entry"):
            col[name] = f[name].astype(np.uint32 if name in ("pool_type", "tag") else np.uint64)
        # outside session events the column is null (valid below); its values are then the pool type
        col["session_id"] = np.where(session, f["session_id"].astype(np.uint32), col["pool_type"])
        col["tid"] = recs.tid[idx]
        col["pid"] = recs.pid[idx]
        parts.append(col)
        valid.append({"session_id": session})
    return _columns(parts, valid)


def _valid(recs: Records, which: np.ndarray, layout: str, malformed: Counter):
    """Per pointer size: (layout, record indices, frame counts) of the records `which` that fit the
    layout — long enough, and with 1 to 192 frames where it has frames; the others are counted."""
    for ptr, idx in _per_pointer_size(recs, which):
        lay = D.layout(layout, ptr)
        n = (recs.payload_len[idx] - lay.fixed_size) >> _SHIFT[ptr]  # floor division, as //
        bad = ((n < 1) | (n > MAX_FRAMES)) if lay.frames else (recs.payload_len[idx] < lay.fixed_size)
        if bad.any():
            malformed[layout] += int(bad.sum())
            idx, n = idx[~bad], n[~bad]
        yield lay, idx, n


def _stack_head(chunk: Chunk, recs: Records, idx: np.ndarray, seq0: int, lay: Layout) -> dict:
    """Columns shared by Stack events and stack-key references: owner timestamp, process, thread."""
    f = _fields(chunk, recs.payload[idx], lay, ("event_ts", "pid", "tid"))
    col = _common(recs, idx, seq0)
    col["event_ts"] = f["event_ts"].view(np.int64)
    col["pid"] = f["pid"]
    col["tid"] = f["tid"]
    return col


def decode_stacks(chunk: Chunk, recs: Records, seq0: int, malformed: Counter, spans: bool = False) -> Columns | None:
    """Stack events with their frames; with `spans`, where the frames are instead (`frame_at`: byte offset in
    the chunk, `frame_n`: count, `frame_ptr`: pointer size), for a caller that hashes them in place."""
    parts = []
    for lay, idx, n in _valid(recs, np.flatnonzero(recs.hook == STACK_HOOK), "stack", malformed):
        col = _stack_head(chunk, recs, idx, seq0, lay)
        at = recs.payload[idx] + lay.fixed_size
        if spans:
            col["frame_at"], col["frame_n"] = at, n.astype(np.int64)
            col["frame_ptr"] = np.full(len(idx), lay.pointer_size, dtype=np.int64)
        else:
            col["frames"] = _frames(chunk, at, n, lay.pointer_size)
        parts.append(col)
    return _columns(parts, lists=None if spans else "frames")


def stack_frames(chunk: Chunk, at: np.ndarray, n: np.ndarray, ptr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The frames of spans from decode_stacks(spans=True) as (offsets, values), in row order."""
    offsets = np.zeros(len(n) + 1, dtype=np.int64)
    np.cumsum(n, out=offsets[1:])
    values = np.zeros(int(offsets[-1]), dtype=np.uint64)
    for size in (8, 4):
        rows = np.flatnonzero(ptr == size)
        if len(rows):
            o, v = _frames(chunk, at[rows], n[rows], size)
            dest = np.repeat(offsets[rows] - o[:-1], n[rows]) + np.arange(int(o[-1]), dtype=np.int64)
            values[dest] = v
    return offsets, values


def decode_key_refs(chunk: Chunk, recs: Records, seq0: int, malformed: Counter) -> Columns | None:
    parts = []
    for lay, idx, _ in _valid(recs, _select(recs, IS_KEY_REF), "stack_key_ref", malformed):
        col = _stack_head(chunk, recs, idx, seq0, lay)
        col["key"] = _field(chunk, recs.payload[idx], lay, "key").astype(np.uint64)
        col["user"] = recs.hook[idx] == H["StackKeyUser"]
        parts.append(col)
    return _columns(parts, lists=None)


def decode_key_defs(chunk: Chunk, recs: Records, seq0: int, malformed: Counter) -> Columns | None:
    parts = []
    for lay, idx, n in _valid(recs, _select(recs, IS_KEY_DEF), "stack_key_def", malformed):
        base = recs.payload[idx]
        col = _common(recs, idx, seq0)
        col["hook"] = recs.hook[idx].astype(np.uint16)
        col["key"] = _field(chunk, base, lay, "key").astype(np.uint64)
        col["frames"] = _frames(chunk, base + lay.fixed_size, n, lay.pointer_size)
        parts.append(col)
    return _columns(parts, lists="frames")


# ---- rare events: one struct unpack per record -------------------------------------------------

def _sid(buf: bytes, pos: int, end: int, ptr: int) -> tuple[str | None, int]:
    if pos + 4 > end:
        raise ValueError
    if struct.unpack_from("<I", buf, pos)[0] == 0:
        return None, pos + 4
    sid = pos + 2 * ptr  # TOKEN_USER {PSID, Attributes} precedes the SID (etl-format.md §2.4)
    if sid + 8 > end:
        raise ValueError
    count = buf[sid + 1]
    sid_end = sid + 8 + 4 * count
    if sid_end > end:
        raise ValueError
    authority = int.from_bytes(buf[sid + 2:sid + 8], "big")
    subs = struct.unpack_from(f"<{count}I", buf, sid + 8)
    return "-".join(["S", str(buf[sid]), str(authority), *map(str, subs)]), sid_end


def _string(buf: bytes, pos: int, end: int, wide: bool) -> tuple[str, int]:
    if wide:
        p = pos
        while p + 1 < end and (buf[p] or buf[p + 1]):
            p += 2
        return buf[pos:p].decode("utf-16-le", errors="replace"), min(p + 2, end)
    p = buf.find(b"\x00", pos, end)
    p = end if p < 0 else p
    return buf[pos:p].decode("utf-8", errors="replace"), min(p + 1, end)


def decode_fields(spec_fields: list, ptr: int, buf: bytes, pos: int, end: int,
                  skip: tuple[str, ...] = ()) -> dict:
    """Decode a layout's fields in order from buf[pos:end]. A trailing field that is not there (an
    older event version) is None; a fixed field cut short raises ValueError."""
    out: dict = {}
    for name, typ in spec_fields:
        if name in skip:
            continue
        if pos >= end:
            out[name] = None
            continue
        if typ == "utf16z" or typ == "ansiz":
            out[name], pos = _string(buf, pos, end, typ == "utf16z")
        elif typ == "sid":
            out[name], pos = _sid(buf, pos, end, ptr)
        elif typ == "guid":
            if pos + 16 > end:
                raise ValueError
            out[name] = str(uuid.UUID(bytes_le=bytes(buf[pos:pos + 16])))
            pos += 16
        else:
            code = ("Q" if ptr == 8 else "I") if typ == "ptr" else FIXED_TYPES[typ]
            size = struct.calcsize("<" + code)
            if pos + size > end:
                raise ValueError
            out[name] = struct.unpack_from("<" + code, buf, pos)[0]
            pos += size
    return out


def decode_rare(chunk: Chunk, recs: Records, seq0: int, malformed: Counter) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    kernel = _select(recs, IS_RARE)
    classic = np.flatnonzero(IS_CLASSIC[recs.htype])
    ktc = classic[(recs.guid[classic, 0] == KTC_GUID_HALVES[0]) & (recs.guid[classic, 1] == KTC_GUID_HALVES[1])]
    if not len(kernel) and not len(ktc):
        return rows
    raw = chunk.data  # indexing a numpy array per byte is slow: work on a bytes copy of the needed span
    buf = raw.tobytes()
    for i in kernel.tolist():
        name = RARE_LAYOUTS[int(recs.hook[i])]
        _decode_one(name, buf, recs, i, seq0, rows, malformed)
    for i in ktc.tolist():
        name = KTC_LAYOUTS.get(int(recs.opcode[i]))
        if name:
            _decode_one(name, buf, recs, i, seq0, rows, malformed)
    return rows


def _decode_one(name: str, buf: bytes, recs: Records, i: int, seq0: int, rows: dict, malformed: Counter) -> None:
    ptr = int(recs.pointer_size[i])
    pos = int(recs.payload[i])
    end = pos + int(recs.payload_len[i])
    skip = ("flags",) if name == "process" and recs.version[i] < 4 else ()  # v3 has no Flags (ref §5.3)
    try:
        row = decode_fields(D.layout_specs[name]["fields"], ptr, buf, pos, end, skip)
    except ValueError:
        malformed[name] += 1
        return
    row.update(ts=int(recs.ts[i]), cpu=int(recs.cpu[i]), seq=seq0 + i, hook=int(recs.hook[i]),
               opcode=int(recs.opcode[i]), version=int(recs.version[i]),
               header_pid=int(recs.pid[i]), header_tid=int(recs.tid[i]))
    rows.setdefault(name, []).append(row)


_ARROW_TYPES = {"u8": pa.uint8(), "u16": pa.uint16(), "u32": pa.uint32(), "u64": pa.uint64(), "i32": pa.int32(),
                "ptr": pa.uint64(), "guid": pa.string(), "utf16z": pa.string(), "ansiz": pa.string(),
                "sid": pa.string()}
_COMMON_SCHEMA = [("ts", pa.int64()), ("cpu", pa.uint16()), ("seq", pa.int64()), ("hook", pa.int32()),
                  ("opcode", pa.int32()), ("version", pa.int32()), ("header_pid", pa.uint32()),
                  ("header_tid", pa.uint32())]


def rare_schema(name: str) -> pa.Schema:
    """Arrow schema of a rare-event table: the layout's fields, then the record header's."""
    fields = [(n, _ARROW_TYPES[t]) for n, t in D.layout_specs[name]["fields"]]
    return pa.schema(fields + _COMMON_SCHEMA)


# ---- pool snapshots: a few events at the start and the stop of a trace ------------------------------

# layout -> the table its rows go to (session snapshots share their global kind's table, with a session id)
SNAPSHOT_TABLES = {"pool_snap": "pool_snap", "pool_snap_session": "pool_snap",
                   "big_pool_snap": "big_pool_snap", "big_pool_snap_session": "big_pool_snap"}
SNAPSHOT_LAYOUTS = {h: name for name in SNAPSHOT_TABLES for h in D.layout_hooks(name)}
IS_SNAPSHOT = _hook_set(SNAPSHOT_LAYOUTS)
SNAPSHOT_END_HOOKS = frozenset(H[n] for n in ("PoolSnapDCEnd", "BigPoolSnapDCEnd", "PoolSnapSessionDCEnd",
                                              "SessionBigPoolSnapDCEnd"))
_SNAPSHOT_COMMON = [("session_id", pa.uint32()), ("ts", pa.int64()), ("cpu", pa.uint16()), ("seq", pa.int64()),
                    ("end", pa.bool_())]


def snapshot_schema(table: str) -> pa.Schema:
    """One row per snapshot entry: the entry's fields, the session (null: global pool), then its event's
    time, CPU, sequence and whether it belongs to the snapshot at the stop (DCEnd) or the start (DCStart)."""
    entry = D.layout_specs[table]["entries"]
    return pa.schema([(n, _ARROW_TYPES[t]) for n, t in D.layout_specs[entry]["fields"]] + _SNAPSHOT_COMMON)


def snapshot_entries(payload: bytes, entry_size: int, head: int = 4) -> tuple[int, int] | None:
    """(offset, count) of the entry array of a snapshot payload, None when it is neither form.

    The kernel writes ``u32 Count`` (and ``u32 SessionId`` for session snapshots: `head` = 8), then Count
    entries (decompiled EtwpPoolRunDown: one data descriptor each, for PoolSnap and BigPoolSnap alike). A
    global snapshot that is a whole number of entries with no count (how etl-format.md's Corrections
    describe BigPoolSnap) is read as that many entries; the two forms cannot be confused, as one has 4 bytes
    more than a multiple of the entry size."""
    n = len(payload)
    if n >= head and (n - head) % entry_size == 0 and \
            struct.unpack_from("<I", payload)[0] * entry_size == n - head:
        return head, (n - head) // entry_size
    if head == 4 and n % entry_size == 0:
        return 0, n // entry_size
    return None


def decode_snapshots(chunk: Chunk, recs: Records, seq0: int, malformed: Counter) -> dict[str, pa.Table]:
    """PoolSnap (per-tag counters, SYSTEM_POOLTAG) and BigPoolSnap (big blocks, SYSTEM_BIGPOOL_ENTRY)
    events, global and per session, as one row per entry."""
    rows: dict[str, list[dict]] = {}
    for i in _select(recs, IS_SNAPSHOT).tolist():
        hook = int(recs.hook[i])
        name = SNAPSHOT_LAYOUTS[hook]
        head = D.layout(name, 4).fixed_size
        entry = D.layout(D.layout_specs[name]["entries"], int(recs.pointer_size[i]))
        pos = int(recs.payload[i])
        payload = chunk.data[pos:pos + int(recs.payload_len[i])].tobytes()
        found = snapshot_entries(payload, entry.fixed_size, head)
        if found is None:
            malformed[name] += 1
            continue
        start, count = found
        session = struct.unpack_from("<I", payload, 4)[0] if head == 8 else None
        common = {"session_id": session, "ts": int(recs.ts[i]), "cpu": int(recs.cpu[i]), "seq": seq0 + i,
                  "end": hook in SNAPSHOT_END_HOOKS}
        out = rows.setdefault(SNAPSHOT_TABLES[name], [])
        for values in struct.iter_unpack(entry.fixed_format, payload[start:start + count * entry.fixed_size]):
            out.append(dict(zip(entry.fixed_names, values, strict=True)) | common)
    return {name: pa.Table.from_pylist(r, schema=snapshot_schema(name)) for name, r in rows.items() if r}


def decode_chunk(chunk: Chunk, recs: Records, seq0: int, frame_spans: bool = False) -> Decoded:
    """Every table of the chunk; with `frame_spans` the stacks table says where its frames are
    (decode_stacks) instead of holding them."""
    malformed: Counter = Counter()
    tables: dict[str, pa.Table] = {}
    for name, func in (("pool", decode_pool), ("stacks", decode_stacks), ("key_refs", decode_key_refs),
                       ("key_defs", decode_key_defs)):
        t = func(chunk, recs, seq0, malformed, frame_spans) if func is decode_stacks else \
            func(chunk, recs, seq0, malformed)
        if t is not None and len(t):
            tables[name] = t
    for name, rows in decode_rare(chunk, recs, seq0, malformed).items():
        tables[name] = pa.Table.from_pylist(rows, schema=rare_schema(name))
    tables.update(decode_snapshots(chunk, recs, seq0, malformed))
    return Decoded(tables, malformed)
