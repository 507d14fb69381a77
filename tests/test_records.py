"""Byte-level tests of the record walk and of every decoder: records are built here from literal
struct layouts taken from ../shared/reference/etl-format.md, not from pooltrace's own definitions."""

from __future__ import annotations

import struct
import uuid

import pytest

from pooltrace.etl import decode
from pooltrace.etl.columns import Columns
from pooltrace.etl.records import Chunk, decode_headers, walk


def pad8(b: bytes) -> bytes:
    return b + b"\x00" * (-len(b) % 8)


def perfinfo(hook: int, ts: int, payload: bytes, *, bits64=True, version=2, ext=b"") -> bytes:
    htype = 0x11 if bits64 else 0x10
    size = 0x10 + len(ext) + len(payload)
    return struct.pack("<BBBBHHq", version & 0xFF, version >> 8, htype, 0xC0, size, hook, ts) + ext + payload


def system(hook: int, ts: int, payload: bytes, *, bits64=True, version=2, tid=11, pid=22) -> bytes:
    htype = 0x02 if bits64 else 0x01
    size = 0x20 + len(payload)
    return struct.pack("<BBBBHHIIqII", version & 0xFF, version >> 8, htype, 0xC0, size, hook, tid, pid, ts,
                       0, 0) + payload


def full(guid: uuid.UUID, opcode: int, ts: int, payload: bytes, *, pid=4, bits64=True) -> bytes:
    size = 0x30 + len(payload)
    return struct.pack("<HBBBBHIIq16sQ", size, 0x14 if bits64 else 0x0A, 0xC0, opcode, 0, 2, 0xFFFFFFFF, pid, ts,
                       guid.bytes_le, 0) + payload


def event(ts: int, provider: uuid.UUID, items: list[tuple[int, bytes]], user: bytes, *, flags=0x41) -> bytes:
    ext = b""
    for k, (etype, data) in enumerate(items):
        body = pad8(data)
        ext += struct.pack("<HHHH", 8 + len(body), etype, 1 if k < len(items) - 1 else 0, len(data)) + body
    size = 0x50 + len(ext) + len(user)
    hdr = struct.pack("<HBBHHIIq16sHBBBBHQQ16s", size, 0x13, 0xC0, flags, 0, 7, 8, ts, provider.bytes_le,
                      1, 0, 0, 4, 9, 0, 0, 0, b"\x00" * 16)
    assert len(hdr) == 0x50
    return hdr + ext + user


def chunk_of(*records: bytes, cpu=0, tail=b"") -> Chunk:
    return Chunk([b"".join(pad8(r) for r in records) + tail], [cpu])


def as_arrow(dec):
    dec.tables = {k: (v.to_arrow() if isinstance(v, Columns) else v) for k, v in dec.tables.items()}
    return dec


def decoded(*records: bytes, cpu=0):
    ch = chunk_of(*records, cpu=cpu)
    recs, problems, dropped = decode_headers(ch)
    assert not problems and not dropped
    return as_arrow(decode.decode_chunk(ch, recs, 100)), recs


def test_pool_alloc_perfinfo64():
    rec = perfinfo(0x0E20, 1234, struct.pack("<IIQQ", 0x201, 0x6B61654C, 0x1000, 0xFFFFA00012345670))
    dec, recs = decoded(rec, cpu=3)
    assert recs.tid[0] == 0xFFFFFFFF and recs.payload_len[0] == 24
    row = dec.tables["pool"].to_pylist()[0]
    assert row == {"ts": 1234, "cpu": 3, "seq": 100, "hook": 0x0E20, "pool_type": 0x201, "tag": 0x6B61654C,
                   "size": 0x1000, "entry": 0xFFFFA00012345670, "session_id": None, "tid": 0xFFFFFFFF,
                   "pid": 0xFFFFFFFF}


def test_pool_session_free_system_header_and_x86():
    r64 = system(0x0E23, 50, struct.pack("<IIQQI", 0x21, 0x20206E49, 64, 0xFFFF900000001000, 3), tid=5, pid=6)
    r32 = perfinfo(0x0E21, 60, struct.pack("<IIIII", 0x21, 0x656C6946, 32, 0x80001000, 2), bits64=False)
    dec, recs = decoded(r64, r32)
    rows = dec.tables["pool"].to_pylist()
    assert list(recs.pointer_size) == [8, 4]
    by_hook = {r["hook"]: r for r in rows}
    assert by_hook[0x0E23]["session_id"] == 3 and by_hook[0x0E23]["tid"] == 5 and by_hook[0x0E23]["pid"] == 6
    assert by_hook[0x0E23]["entry"] == 0xFFFF900000001000
    assert by_hook[0x0E21]["entry"] == 0x80001000 and by_hook[0x0E21]["size"] == 32
    assert by_hook[0x0E21]["session_id"] == 2


def test_pmc_and_pebs_extension_qwords_shift_the_payload():
    payload = struct.pack("<IIQQ", 1, 0x6B61654C, 8, 0x1000)
    pmc = perfinfo(0x0E20, 1, payload, version=0x0202, ext=struct.pack("<QQ", 111, 222))  # 2 counters
    pebs = perfinfo(0x0E22, 2, payload, version=0x8002, ext=struct.pack("<Q", 333))
    dec, recs = decoded(pmc, pebs)
    assert list(recs.version) == [2, 2]
    assert [r["entry"] for r in dec.tables["pool"].to_pylist()] == [0x1000, 0x1000]


def test_stack_frames_from_the_record_size():
    frames = [0xFFFFF80000001000 + i for i in range(5)]
    r64 = perfinfo(0x1820, 10, struct.pack("<qII5Q", 9, 4, 8, *frames))
    r32 = perfinfo(0x1820, 11, struct.pack("<qII2I", 9, 4, 8, 0x401000, 0x402000), bits64=False)
    dec, _ = decoded(r64, r32)
    rows = dec.tables["stacks"].to_pylist()
    assert rows[0]["frames"] == frames and rows[0]["event_ts"] == 9 and (rows[0]["pid"], rows[0]["tid"]) == (4, 8)
    assert rows[1]["frames"] == [0x401000, 0x402000]


def test_stack_with_too_many_frames_is_malformed():
    rec = perfinfo(0x1820, 10, struct.pack("<qII", 9, 4, 8) + b"\x01" * 8 * 193)
    ch = chunk_of(rec)
    recs, _, _ = decode_headers(ch)
    dec = decode.decode_chunk(ch, recs, 0)
    assert "stacks" not in dec.tables and dec.malformed["stack"] == 1


def test_stack_key_reference_and_definition():
    ref = perfinfo(0x1826, 20, struct.pack("<qIIQ", 19, 4, 8, 0xFFFFC00000000010))
    kdef = perfinfo(0x1823, 30, struct.pack("<Q3Q", 0xFFFFC00000000010, 1, 2, 3))
    dec, _ = decoded(ref, kdef)
    r = dec.tables["key_refs"].to_pylist()[0]
    assert (r["event_ts"], r["key"], r["user"]) == (19, 0xFFFFC00000000010, True)
    d = dec.tables["key_defs"].to_pylist()[0]
    assert (d["key"], d["frames"], d["hook"]) == (0xFFFFC00000000010, [1, 2, 3], 0x1823)


def test_short_pool_payload_is_counted_not_decoded():
    ch = chunk_of(perfinfo(0x0E20, 1, b"\x00" * 12))
    recs, _, _ = decode_headers(ch)
    dec = decode.decode_chunk(ch, recs, 0)
    assert "pool" not in dec.tables and dec.malformed["pool"] == 1


def image_payload(ptr: int, base: int, size: int, pid: int, name: str) -> bytes:
    p = "Q" if ptr == 8 else "I"
    fixed = struct.pack(f"<{p}{p}IIIBBH{p}IIII", base, size, pid, 0xC0FFEE, 0x5F000000, 1, 2, 0, 0, 0, 0, 0, 0)
    assert len(fixed) == (0x38 if ptr == 8 else 0x2C)
    return fixed + (name + "\x00").encode("utf-16-le")


def test_image_events_both_pointer_sizes():
    r64 = system(0x1403, 5, image_payload(8, 0xFFFFF80000000000, 0x800000, 0, r"\SystemRoot\system32\ntoskrnl.exe"),
                 version=3)
    r32 = system(0x030A, 6, image_payload(4, 0x400000, 0x1000, 1234, r"\Device\HarddiskVolume2\a.exe"),
                 bits64=False, version=3)
    dec, _ = decoded(r64, r32)
    rows = dec.tables["image"].to_pylist()
    assert (rows[0]["base"], rows[0]["size"], rows[0]["pid"], rows[0]["checksum"], rows[0]["timedatestamp"]) == (
        0xFFFFF80000000000, 0x800000, 0, 0xC0FFEE, 0x5F000000)
    assert rows[0]["filename"].endswith("ntoskrnl.exe") and rows[0]["hook"] == 0x1403
    assert (rows[1]["base"], rows[1]["pid"], rows[1]["filename"]) == (0x400000, 1234, r"\Device\HarddiskVolume2\a.exe")


def test_process_v4_with_sid_and_v3_without_flags():
    sid = bytes([1, 2]) + (5).to_bytes(6, "big") + struct.pack("<II", 32, 544)
    v4 = struct.pack("<QIIIiQI", 0xFFFF1, 100, 4, 1, 0, 0x1AA000, 0) + struct.pack("<I", 1) + b"\x00" * 12 + sid
    v4 += b"cmd.exe\x00" + "cmd /c leak\x00".encode("utf-16-le")
    v3 = struct.pack("<QIIIiQ", 0xFFFF2, 200, 100, 1, 0, 0) + struct.pack("<I", 0) + b"x.exe\x00" + b"\x00\x00"
    dec, _ = decoded(system(0x0301, 1, v4, version=4), system(0x0302, 2, v3, version=3))
    p4, p3 = dec.tables["process"].to_pylist()
    assert (p4["pid"], p4["ppid"], p4["session_id"], p4["image_name"], p4["command_line"]) == (
        100, 4, 1, "cmd.exe", "cmd /c leak")
    assert p4["user_sid"] == "S-1-5-32-544"
    assert (p3["pid"], p3["image_name"], p3["flags"], p3["user_sid"]) == (200, "x.exe", None, None)


def test_thread_v3_with_name():
    body = struct.pack("<II7QIBBBB", 4, 88, *range(7), 0, 8, 5, 2, 0) + "worker\x00".encode("utf-16-le")
    dec, _ = decoded(system(0x0503, 1, body, version=3))
    t = dec.tables["thread"].to_pylist()[0]
    assert (t["pid"], t["tid"], t["thread_name"], t["win32_start_address"]) == (4, 88, "worker", 5)


def test_ktc_rsds_and_image_id():
    ktc = uuid.UUID("b3e675d7-2554-4f18-830b-2762732560de")
    g = uuid.UUID("ec83d8df-5559-46e0-b630-133ebd979266")
    rsds = full(ktc, 0x24, 7, struct.pack("<QI16sI", 0x77710000, 4, g.bytes_le, 2) + b"wntdll.pdb\x00")
    iid = full(ktc, 0x00, 7, struct.pack("<QQII", 0x77710000, 0x157000, 4, 0x50123456) +
               "ntdll.dll\x00".encode("utf-16-le"))
    other = full(uuid.uuid4(), 0x24, 7, b"\x00" * 40)
    dec, recs = decoded(rsds, iid, other)
    r = dec.tables["ktc_rsds"].to_pylist()
    assert len(r) == 1 and (r[0]["base"], r[0]["pid"], r[0]["guid"], r[0]["age"], r[0]["pdb_name"]) == (
        0x77710000, 4, str(g), 2, "wntdll.pdb")
    i = dec.tables["ktc_image_id"].to_pylist()[0]
    assert (i["size"], i["timedatestamp"], i["original_filename"]) == (0x157000, 0x50123456, "ntdll.dll")
    assert list(recs.opcode) == [0x24, 0, 0x24] and list(recs.hook) == [-1, -1, -1]


def test_event_header_extended_items_follow_linkage():
    prov = uuid.UUID("8e805eb3-6a8f-4a1e-90fa-a831d94e54a1")
    rec = event(77, prov, [(12, b"traits!"), (11, b"schema-bytes-x")], b"USERDATA")
    _, recs = decoded(rec)
    pos, plen = int(recs.payload[0]), int(recs.payload_len[0])
    ch = chunk_of(rec)
    assert ch.data[pos:pos + plen].tobytes() == b"USERDATA"
    assert (recs.tid[0], recs.pid[0], recs.ts[0], recs.opcode[0]) == (7, 8, 77, 9)


def test_header_extension_group_masks():
    dec, _ = decoded(system(0x0005, 0, struct.pack("<9I", 7, 0x40, 0, 0, 0, 0, 0, 0, 2)))
    m = dec.tables["header_extension"].to_pylist()[0]
    assert (m["group_mask_0"], m["group_mask_1"], m["kernel_event_version"]) == (7, 0x40, 2)


def test_walk_stops_at_end_marker_and_reports_corruption():
    good = perfinfo(0x0E20, 1, struct.pack("<IIQQ", 0, 0x6B61654C, 8, 0x10))
    ch = chunk_of(good, tail=b"\xff" * 64)
    slots, _, problems = walk(ch)
    assert len(slots) == 1 and problems == []
    bad = bytearray(pad8(good))
    struct.pack_into("<H", bad, 4, 4)  # Size smaller than the header
    ch = chunk_of(good, bytes(bad), good)
    slots, _, problems = walk(ch)
    assert len(slots) == 1 and problems[0][2] == "record header not valid" and problems[0][1] == 2 * 40
    long = bytearray(pad8(good))
    struct.pack_into("<H", long, 4, 400)  # runs past the buffer's end
    slots, _, problems = walk(chunk_of(good, bytes(long)))
    assert len(slots) == 1 and "past" in problems[0][2]


def test_end_marker_with_data_after_it_is_reported():
    """An end-of-buffer marker where a record should start is the buffer's end when only 0xFF padding follows
    it; with other bytes after it inside the filled area (a damaged size, or a flipped bit in a compressed
    stream, mutation campaign seed 101447) the bytes after it are said as skipped, not dropped in silence."""
    good = perfinfo(0x0E20, 1, struct.pack("<IIQQ", 0, 0x6B61654C, 8, 0x10))
    marker = b"\xff" * 8
    slots, _, problems = walk(chunk_of(good, marker + b"\xff" * 56))  # both inside the filled area
    assert len(slots) == 1 and problems == []
    after = pad8(good) + pad8(good)
    slots, _, problems = walk(chunk_of(good, marker + after))
    assert len(slots) == 1
    assert problems == [(0, len(marker) + len(after), "end-of-buffer marker before the filled end, with data after it")]
    recs, problems, _ = decode_headers(chunk_of(good, marker + after, good))
    assert len(recs) == 1 and len(problems) == 1


def test_wpp_message_record_is_stepped_over():
    msg = struct.pack("<HBB", 24, 0x00, 0x90) + b"\x00" * 20
    good = perfinfo(0x0E20, 1, struct.pack("<IIQQ", 0, 0x6B61654C, 8, 0x10))
    ch = chunk_of(msg, good)
    recs, problems, _ = decode_headers(ch)
    assert not problems and len(recs) == 2 and recs.hook[1] == 0x0E20
    assert len(decode.decode_chunk(ch, recs, 0).tables["pool"]) == 1


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_gather_unaligned(size):
    ch = Chunk([bytes(range(64))], [0])
    import numpy as np

    got = decode.gather(ch, np.array([3, 5]), size)
    assert got.tolist() == [int.from_bytes(bytes(range(o, o + size)), "little") for o in (3, 5)]


@pytest.mark.parametrize("shift", [0, 4, 3])
def test_fields_read_from_gathered_rows_equal_gathers(shift):
    """_fields reads kernel payload fields from 8-byte words gathered once per record when every payload is
    8-aligned, and by one gather per field otherwise: both give the bytes the layout places there."""
    import numpy as np

    from pooltrace.definitions import definitions

    lay = definitions().layout("pool_session", 8)
    payloads = [struct.pack("<IIQQI", 0x201 + k, 0x6B61654C ^ k, 0x1000 * k, 0xFFFFA00012345670 + k, k)
                for k in range(5)]
    raw = b"".join(b"\xee" * shift + pad8(p) for p in payloads)
    ch = Chunk([raw + b"\x00" * 8], [0])
    base = np.array([shift + k * (len(pad8(payloads[0])) + shift) for k in range(5)])
    got = decode._fields(ch, base, lay, ("pool_type", "tag", "size", "entry", "session_id"))
    assert [dict(zip(got, vals, strict=True)) for vals in zip(*(v.tolist() for v in got.values()), strict=True)] == \
        [dict(zip(("pool_type", "tag", "size", "entry", "session_id"), struct.unpack("<IIQQI", p), strict=True))
         for p in payloads]
    assert all(v.flags.c_contiguous for v in got.values())
