"""decode_headers against a record-by-record reference decoder written here with `struct` from the header
layouts of ../shared/reference/etl-format.md §1.3-1.4, on hand-built chunks of every header kind, on every
buffer of the real samples and of a generated pool trace, and on damaged copies of them."""

from __future__ import annotations

import struct
import uuid

import numpy as np
import pytest

from pooltrace.etl.buffers import BufferSource, FileBytes, scan_buffers
from pooltrace.etl.records import Chunk, decode_headers, walk
from tests.test_records import chunk_of, event, full, pad8, perfinfo, system

SYSTEM_LIKE = {0x01: 0x20, 0x02: 0x20, 0x03: 0x18, 0x04: 0x18, 0x10: 0x10, 0x11: 0x10}  # header lengths
CLASSIC = {0x0A: 0x30, 0x14: 0x30, 0x0B: 0x48, 0x15: 0x48}
EVENT = {0x12: 0x50, 0x13: 0x50}
BITS64 = {0x02, 0x04, 0x11, 0x13, 0x14, 0x15}
FIELDS = ("pos", "htype", "size", "hook", "version", "ts", "tid", "pid", "pointer_size", "payload", "payload_len",
          "cpu", "opcode", "guid")


def reference(raw: bytes, pos: int, cpu: int) -> dict | None:
    """One record's header fields as decode_headers defines them; None when the record is dropped (its
    header, with any extension, is longer than its Size)."""
    w0, htype, flags = struct.unpack_from("<HBB", raw, pos)
    syslike = htype in SYSTEM_LIKE
    message = flags & 0xD0 == 0x90  # WPP TRACE_MESSAGE: size at +0, no payload decoded
    ext = ((w0 >> 8) & 7) + (w0 >> 15) if syslike else 0  # PMC counters and PEBS index (8 bytes each)
    r = {"pos": pos, "hook": -1, "version": 0, "opcode": -1, "guid": (0, 0), "cpu": cpu}
    if syslike:
        r["size"], r["hook"] = struct.unpack_from("<HH", raw, pos + 4)
        r["version"] = w0 & 0x78FF
    if message or not syslike:
        r["size"] = w0
    kind = 0xFE if message else htype
    r["htype"] = kind
    hlen = SYSTEM_LIKE.get(kind) or CLASSIC.get(kind) or EVENT.get(kind) or 0
    hlen += 8 * ext
    perf = kind in (0x10, 0x11)
    (r["ts"],) = struct.unpack_from("<q", raw, pos + (8 if perf else 16))
    if message or perf:
        r["tid"] = r["pid"] = 0xFFFFFFFF
    else:
        r["tid"], r["pid"] = struct.unpack_from("<II", raw, pos + 8)
    if kind in CLASSIC:
        r["opcode"] = raw[pos + 4]
        (r["version"],) = struct.unpack_from("<H", raw, pos + 6)
    if kind in EVENT:
        r["opcode"], r["version"] = raw[pos + 0x2D], raw[pos + 0x2A]
        if struct.unpack_from("<H", raw, pos + 4)[0] & 1:  # extended data items, chained by Linkage
            p, end = pos + 0x50, pos + r["size"]
            while p + 8 <= end:
                isize, _t, link, _n = struct.unpack_from("<HHHH", raw, p)
                if isize < 8:
                    return None
                p += isize
                if not link & 1:
                    break
            hlen = p - pos
    if kind in CLASSIC or kind in EVENT:
        r["guid"] = struct.unpack_from("<QQ", raw, pos + 24)
    if r["size"] < hlen and not message:
        return None
    r["pointer_size"] = 8 if kind in BITS64 else 4 if kind in SYSTEM_LIKE or kind in CLASSIC or kind in EVENT else 0
    r["payload"] = pos + hlen
    r["payload_len"] = 0 if message else r["size"] - hlen
    return r


def check(chunk: Chunk) -> int:
    """decode_headers(chunk) equals the reference record by record (same dtypes as before the vectorized
    decoder); returns the number of records."""
    recs, _problems, dropped = decode_headers(chunk)
    slots, owner, _ = walk(chunk)
    raw = chunk.data.tobytes()
    want = [reference(raw, int(s) * 8, int(chunk.cpus[o])) for s, o in zip(slots, owner, strict=True)]
    assert dropped == sum(w is None for w in want)
    want = [w for w in want if w is not None]
    assert len(recs) == len(want)
    dtypes = {"tid": np.uint32, "pid": np.uint32, "guid": np.uint64}
    for name in FIELDS:
        got = getattr(recs, name)
        assert got.dtype == dtypes.get(name, np.int64), name
        expect = [w[name] for w in want]
        if name == "guid":
            assert got.shape == (len(want), 2)
            assert [tuple(g) for g in got.tolist()] == [tuple(e) for e in expect]
        else:
            assert got.tolist() == expect, name
    return len(recs)


def test_every_header_kind_in_one_chunk():
    g = uuid.UUID("0268a8b6-74fd-4302-9dd0-6e8f1795c0cf")
    pool = struct.pack("<IIQQ", 0x201, 0x6B61654C, 0x1000, 0xFFFFA00012345670)
    records = [
        system(0x0E20, 10, pool, tid=5, pid=6),
        system(0x0B17, 11, b"\x01" * 12, bits64=False),
        perfinfo(0x1820, 12, struct.pack("<qII", 12, 1, 2) + b"\x00" * 24),
        perfinfo(0x0E21, 12, struct.pack("<IIIII", 0x21, 0x656C6946, 32, 0x80001000, 2), bits64=False),
        perfinfo(0x0E21, 13, pool, ext=b"\x00" * 16, version=0x0200 | 2),  # two PMC counters
        perfinfo(0x0E21, 14, pool, ext=b"\x00" * 8, version=0x8002),  # PEBS index
        full(g, 0x24, 15, b"abcd", pid=9),
        full(g, 0x25, 16, b"", bits64=False),
        event(17, g, [(1, b"x" * 5), (2, b"y" * 16)], b"user"),
        event(18, g, [], b"plain", flags=0x40),
        struct.pack("<HBB", 24, 0x11, 0x90) + b"\x07" * 20,  # a WPP message with a PERFINFO-like type byte
        struct.pack("<HBB", 16, 0x00, 0x94) + b"\x00" * 12,
    ]
    compact = bytearray(system(0x0E22, 19, pool))
    compact[2] = 0x04  # COMPACT64: no Kernel/UserTime, payload at 0x18
    struct.pack_into("<H", compact, 4, 0x18 + len(pool))
    records.append(bytes(compact[:0x18]) + pool)
    assert check(chunk_of(*records, cpu=3)) == len(records)


def test_records_whose_header_is_longer_than_their_size_are_dropped():
    pool = struct.pack("<IIQQ", 0x201, 0x6B61654C, 0x1000, 0x10)
    pmc = bytearray(perfinfo(0x0E20, 2, pool))
    struct.pack_into("<H", pmc, 0, 0x0702)  # seven PMC counters (56 bytes) in a 56-byte record
    g = uuid.UUID(int=7)
    bad_ext = bytearray(event(3, g, [(1, b"abc")], b"u"))
    struct.pack_into("<H", bad_ext, 0x50, 4)  # an extended item shorter than its own header
    ch = chunk_of(perfinfo(0x0E20, 1, pool), bytes(pmc), bytes(bad_ext), perfinfo(0x0E20, 4, pool))
    assert check(ch) == 2
    assert decode_headers(ch)[2] == 2


def test_empty_chunk():
    assert check(chunk_of(tail=b"\xff" * 16)) == 0


def _chunks(path, limit: int | None = None):
    with open(path, "rb") as fh:
        import os

        data = FileBytes(fh.fileno(), os.fstat(fh.fileno()).st_size)
        index = scan_buffers(data)
        source = BufferSource(data, index)
        for i in range(len(index))[:limit]:
            try:
                area = source.area(i)
            except ValueError:
                continue
            yield area, int(index.cpu[i])


SAMPLE_NAMES = ["ShutdownPerfDiagLogger.etl", "net452-x64-merged.etl", "SelfDescribingSingleEvent.etl",
                "AMSITrace.etl"]


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_real_sample_buffers(samples, name):
    total = 0
    for area, cpu in _chunks(samples / name, limit=40):
        total += check(Chunk([area], [cpu]))
    assert total > 0


def _generated(tmp_path):
    from pooltrace.synthetic import classic_leak

    writer, _truth = classic_leak(scale=1, cpus=2, duration_s=2.0)
    path = tmp_path / "t.etl"
    path.write_bytes(writer.to_bytes())
    return list(_chunks(path))


def test_generated_trace_buffers_in_one_chunk(tmp_path):
    areas = _generated(tmp_path)
    assert check(Chunk([a for a, _ in areas], [c for _, c in areas])) > 1000


def test_damaged_buffers(tmp_path, samples):
    """Random bytes overwritten in real and generated buffers: whatever the walk then finds (other header
    kinds, WPP flags, sizes that drop records), every record decodes as the reference says."""
    rng = np.random.default_rng(14)
    areas = _generated(tmp_path)[:6] + list(_chunks(samples / "net452-x64-merged.etl", limit=6))
    heads = [walk(Chunk([a], [0]))[0] for a, _ in areas]  # where records start: their header bytes are damaged too
    seen = np.zeros(256, dtype=np.int64)
    dropped = 0
    for _ in range(15):
        parts = []
        for (area, _cpu), starts in zip(areas, heads, strict=True):
            a = bytearray(area)
            where = rng.integers(0, len(a), 6).tolist() + (rng.choice(starts, 6) * 8 + rng.integers(0, 4, 6)).tolist()
            for at in where:
                a[at] = int(rng.choice([0x90, 0xC0, 0x11, 0x13, 0x14, 0x02, 0x81, 0xFF, int(rng.integers(256))]))
            parts.append(bytes(a))
        chunk = Chunk(parts, [c for _, c in areas])
        check(chunk)
        recs, _, n = decode_headers(chunk)
        seen += np.bincount(recs.htype, minlength=256)
        dropped += n
    assert seen[0xFE] and seen[[0x14, 0x0A, 0x15, 0x0B, 0x12, 0x13]].sum() and dropped  # the damage reached them


def test_padding_bytes_never_read_as_fields():
    """Each record is padded to 8 bytes with stale memory (etl-format.md §1.3): fields come from the header only."""
    rec = system(0x0E20, 99, struct.pack("<IIQQ", 1, 2, 3, 4) + b"\x01")
    stale = rec + b"\xAB" * (-len(rec) % 8)
    assert check(Chunk([stale + pad8(rec)], [1])) == 2
