"""TraceWriter output checked byte by byte against the layouts documented in
shared/reference/etl-format.md (§1.2 buffer header, §1.3 record headers, §1.4 extended items, §1.5
logfile header, §2 payloads, §6 fixture recipe). Every offset used here is written out from that
document, not taken from the writer module; dissect.etl then serves as an independent reader."""

from __future__ import annotations

import io
import struct
import uuid

import pyfwnt
import pytest

from pooltrace.etl.writer import TraceWriter

START_QPC = 1_000_000_000
START_FT = 133_000_000_000_000_000
KTC = uuid.UUID("b3e675d7-2554-4f18-830b-2762732560de")

# --- the documented layouts -------------------------------------------------------------------------------

BUF_HDR = 0x48


def buffer_header(data: bytes, off: int) -> dict[str, int]:
    """WMI_BUFFER_HEADER, etl-format.md §1.2."""
    u32 = lambda o: struct.unpack_from("<I", data, off + o)[0]  # noqa: E731
    u16 = lambda o: struct.unpack_from("<H", data, off + o)[0]  # noqa: E731
    i64 = lambda o: struct.unpack_from("<q", data, off + o)[0]  # noqa: E731
    return {
        "BufferSize": u32(0x00),
        "SavedOffset": u32(0x04),
        "CurrentOffset": u32(0x08),
        "TimeStamp": i64(0x10),
        "SequenceNumber": i64(0x18),
        "ProcessorIndex": u16(0x28),
        "State": u32(0x2C),
        "Offset": u32(0x30),
        "BufferFlag": u16(0x34),
        "BufferType": u16(0x36),
        "off": off,
    }


def walk_buffers(data: bytes) -> list[dict[str, int]]:
    """Step by each buffer's own BufferSize (§1.1); the walk must land exactly on EOF."""
    out = []
    off = 0
    while off + BUF_HDR <= len(data):
        h = buffer_header(data, off)
        assert h["BufferSize"] >= BUF_HDR
        out.append(h)
        off += h["BufferSize"]
    assert off == len(data), "last buffer does not end at EOF"
    return out


def buffer_area(data: bytes, h: dict[str, int]) -> bytes:
    """Record bytes of a buffer: [off+0x48, off+Offset), decompressed when BufferFlag & 0x40 (§1.8)."""
    if h["BufferFlag"] & 0x40:
        stream = data[h["off"] + BUF_HDR : h["off"] + h["BufferSize"]]
        return pyfwnt.lzxpress_decompress(stream, h["Offset"] - BUF_HDR)
    return data[h["off"] + BUF_HDR : h["off"] + h["Offset"]]


def record_size(rec: bytes) -> int:
    """§1.3: SYSTEM/COMPACT/PERFINFO carry Size at +4; EVENT_HEADER and FULL_HEADER at +0."""
    htype = rec[2]
    if rec[3] == 0xC0 and htype in (0x01, 0x02, 0x03, 0x04, 0x10, 0x11):
        return struct.unpack_from("<H", rec, 4)[0]
    return struct.unpack_from("<H", rec, 0)[0]


def records(area: bytes) -> list[tuple[int, bytes]]:
    """(position, record bytes without padding); records are 8-byte aligned (§1.3)."""
    out = []
    pos = 0
    while pos + 4 <= len(area) and area[pos : pos + 4] != b"\xff\xff\xff\xff":
        size = record_size(area[pos:])
        assert size >= 0x10
        out.append((pos, area[pos : pos + size]))
        pos += (size + 7) & ~7
    assert pos == len(area), "records do not fill the used area exactly"
    return out


def all_data_records(data: bytes) -> list[tuple[int, dict[str, int], bytes]]:
    """(cpu, buffer header, record) in file order, data buffers only."""
    return [(h["ProcessorIndex"], h, r) for h in walk_buffers(data)[1:] for _, r in records(buffer_area(data, h))]


def perfinfo(rec: bytes) -> tuple[int, int, int, int]:
    """PERFINFO_TRACE_HEADER: u32 Marker; u16 Size; u16 HookId; i64 SystemTime (payload at 0x10)."""
    return struct.unpack_from("<IHHq", rec, 0)


def system(rec: bytes) -> tuple[int, int, int, int, int, int]:
    """SYSTEM_TRACE_HEADER: u32 Marker; u16 Size; u16 HookId; u32 TID; u32 PID; i64 SystemTime (0x20)."""
    return struct.unpack_from("<IHHIIq", rec, 0)


def timestamp_of(rec: bytes) -> int:
    """§1.3: PERFINFO SystemTime at +8; SYSTEM/COMPACT SystemTime and EVENT/FULL TimeStamp at +16."""
    at = 8 if rec[3] == 0xC0 and rec[2] in (0x10, 0x11) else 16
    return struct.unpack_from("<q", rec, at)[0]


def hook_of(rec: bytes) -> int:
    return struct.unpack_from("<H", rec, 6)[0]


# TRACE_LOGFILE_HEADER offsets, etl-format.md §1.5 table: name -> (x86, x64, struct code)
LOGFILE = {
    "BufferSize": (0x00, 0x00, "I"),
    "Version": (0x04, 0x04, "I"),
    "ProviderVersion": (0x08, 0x08, "I"),
    "NumberOfProcessors": (0x0C, 0x0C, "I"),
    "EndTime": (0x10, 0x10, "q"),
    "LogFileMode": (0x20, 0x20, "I"),
    "BuffersWritten": (0x24, 0x24, "I"),
    "PointerSize": (0x2C, 0x2C, "I"),
    "EventsLost": (0x30, 0x30, "I"),
    "CpuSpeedInMHz": (0x34, 0x34, "I"),
    "BootTime": (0xF0, 0xF8, "q"),
    "PerfFreq": (0xF8, 0x100, "q"),
    "StartTime": (0x100, 0x108, "q"),
    "ReservedFlags": (0x108, 0x110, "I"),
    "BuffersLost": (0x10C, 0x114, "I"),
}
LOGFILE_STRINGS = {4: 0x110, 8: 0x118}


def logfile_header(rec: bytes, pointer_size: int) -> dict[str, object]:
    body = rec[0x20:]  # after the SYSTEM header
    col = 0 if pointer_size == 4 else 1
    fields = {k: struct.unpack_from("<" + v[2], body, v[col])[0] for k, v in LOGFILE.items()}
    names = body[LOGFILE_STRINGS[pointer_size] :].decode("utf-16-le").split("\0")
    fields["LoggerName"], fields["LogFileName"] = names[0], names[1]
    assert names[2:] == [""], "strings do not end exactly at the record's Size"
    return fields


# --- a trace with every kind of record ----------------------------------------------------------------


def full_trace(pointer_size: int = 8, compressed: bool = False, **kw) -> TraceWriter:
    w = TraceWriter(pointer_size, 2, compressed=compressed, **kw)
    kbase = 0xFFFFF80412000000 if pointer_size == 8 else 0x82000000
    t = START_QPC + 10
    w.image(0, t, 0x1403, kbase, 0x1046000, 0, r"\SystemRoot\system32\ntoskrnl.exe", timedatestamp=0x5F3E1A2B)
    w.ktc_image_id(0, t, kbase, 0x1046000, 0, 0x5F3E1A2B, "ntoskrnl.exe")
    w.ktc_rsds(0, t, kbase, 0, uuid.UUID("3844dbb9-2017-4967-be7a-a4a2c20430fa"), 1, "ntkrnlmp.pdb")
    w.process(1, t, 0x0303, 4, 0, "System", "", sid=bytes([1, 1, 0, 0, 0, 0, 0, 5, 18, 0, 0, 0]))
    w.process(1, t + 1, 0x0301, 4242, 1000, "leakapp.exe", r"C:\leakapp.exe --go", session_id=1)
    w.thread(1, t + 2, 0x0503, 4, 8, name="worker")
    w.thread(0, t + 3, 0x0501, 4242, 4300)
    for i in range(400):
        cpu = i % 2
        ts = START_QPC + 1000 + i * 37
        w.pool(cpu, ts, 0x0E20, 0x200, "Leak", 0x100, kbase + 0x10000 + i * 0x200, tid=4300, pid=4242)
        w.stack(cpu, ts, ts, 4242, 4300, [kbase + 0x3A41F2 + k for k in range(i % 30 + 1)])
        if i % 5 == 0:
            w.pool(cpu, ts + 20, 0x0E23, 0x21, "Gh05", 0x80, kbase + 0x900000 + i * 0x80, session_id=1,
                   tid=4300, pid=4242)
            w.stack_key_ref(cpu, ts + 20, ts + 20, 4242, 4300, 0xFFFFC00000001000 if pointer_size == 8 else 0x9000)
            w.stack_key_ref(cpu, ts + 21, ts + 20, 4242, 4300, 0x2000, user=True)
    w.stack_key_def(1, START_QPC + 50_000, 0x2000, [0x7FF61000 + k for k in range(6)], rundown=True)
    w.image(1, START_QPC + 60_000, 0x1404, kbase, 0x1046000, 0, r"\SystemRoot\system32\ntoskrnl.exe")
    return w


# --- header buffer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pointer_size", [8, 4])
def test_header_buffer_and_logfile_header(pointer_size):
    w = TraceWriter(
        pointer_size,
        3,
        buffer_size=8192,
        perf_freq=3_000_000,
        events_lost=7,
        buffers_lost=2,
        cpu_speed_mhz=2600,
        os_build=22631,
        logger_name="NT Kernel Logger",
        logfile_name=r"C:\t\x.etl",
    )
    for i in range(300):
        w.pool(i % 3, START_QPC + 3_000_000 + i, 0x0E20, 1, "Leak", 16, 0x1000 + 16 * i)
    data = w.to_bytes()
    bufs = walk_buffers(data)
    hdr = bufs[0]
    assert hdr["BufferSize"] == 8192
    assert (hdr["BufferFlag"], hdr["BufferType"], hdr["SequenceNumber"]) == (0x21, 4, 0)
    assert hdr["Offset"] == hdr["SavedOffset"]
    assert len(data) == 8192 * len(bufs)

    recs = records(buffer_area(data, hdr))
    assert len(recs) == 2  # logfile header + the default header extension
    first = recs[0][1]
    marker, size, hook, tid, pid, systime = system(first)
    assert marker == (0xC0020002 if pointer_size == 8 else 0xC0010002)
    assert hook == 0 and systime == START_QPC and pid == 4
    strings = ("NT Kernel Logger\0" + "C:\\t\\x.etl\0").encode("utf-16-le")
    assert size == 0x20 + LOGFILE_STRINGS[pointer_size] + len(strings)

    lh = logfile_header(first, pointer_size)
    assert lh["BufferSize"] == 8192
    assert lh["Version"] == 0x0501000A  # 10.0, layout 1.5
    assert lh["ProviderVersion"] == 22631
    assert lh["NumberOfProcessors"] == 3
    assert lh["LogFileMode"] == 0x1
    assert lh["BuffersWritten"] == len(bufs) > 3
    assert lh["PointerSize"] == pointer_size
    assert lh["EventsLost"] == 7 and lh["BuffersLost"] == 2
    assert lh["CpuSpeedInMHz"] == 2600
    assert lh["PerfFreq"] == 3_000_000
    assert lh["StartTime"] == START_FT
    assert lh["ReservedFlags"] == 1
    # BootTime = StartTime - start ticks in 100 ns; EndTime = time of the last event (§1.6)
    assert lh["BootTime"] == START_FT - START_QPC * 10_000_000 // 3_000_000
    assert lh["EndTime"] == START_FT + (3_000_000 + 299) * 10_000_000 // 3_000_000
    assert (lh["LoggerName"], lh["LogFileName"]) == ("NT Kernel Logger", r"C:\t\x.etl")

    # 0x0005 header extension: u32 GroupMask[8]; u32 KernelEventVersion
    ext = recs[1][1]
    assert system(ext)[2] == 0x0005 and system(ext)[1] == 0x20 + 36
    assert struct.unpack_from("<9I", ext, 0x20) == (0x7, 0x40, 0, 0, 0, 0, 0, 0, 0)


def test_explicit_times_and_extra_header_extension():
    w = TraceWriter(boot_filetime=123, end_filetime=456, header_extension=False, clock_type=2)
    w.header_extension((1, 2, 3, 4, 5, 6, 7, 8), kernel_event_version=9)
    data = w.to_bytes()
    recs = records(buffer_area(data, walk_buffers(data)[0]))
    lh = logfile_header(recs[0][1], 8)
    assert (lh["BootTime"], lh["EndTime"], lh["ReservedFlags"]) == (123, 456, 2)
    assert len(recs) == 2 and struct.unpack_from("<9I", recs[1][1], 0x20) == (1, 2, 3, 4, 5, 6, 7, 8, 9)
    assert w.record_count == 2


def test_empty_trace_is_just_the_header_buffer():
    w = TraceWriter()
    data = w.to_bytes()
    bufs = walk_buffers(data)
    assert len(bufs) == 1 and len(data) == 65536
    assert logfile_header(records(buffer_area(data, bufs[0]))[0][1], 8)["BuffersWritten"] == 1
    assert w.record_count == 2


# --- record layouts --------------------------------------------------------------------------------------


def only_record(w: TraceWriter) -> bytes:
    recs = all_data_records(w.to_bytes())
    assert len(recs) == 1
    return recs[0][2]


@pytest.mark.parametrize("pointer_size", [8, 4])
def test_pool_record_default_is_system_header(pointer_size):
    """The kernel logs pool events with a SYSTEM header: ThreadId at +8, ProcessId at +12, payload at 0x20."""
    w = TraceWriter(pointer_size)
    entry = 0xFFFF_A001_2345_6780 if pointer_size == 8 else 0x8123_4560
    w.pool(1, START_QPC + 5, 0x0E20, 0x200, "Leak", 0x100, entry, tid=0x1234, pid=0x4242)
    rec = only_record(w)
    marker, size, hook, tid, pid, ts = system(rec)
    assert marker == (0xC0020002 if pointer_size == 8 else 0xC0010002)
    assert size == 0x20 + (24 if pointer_size == 8 else 16) == len(rec)
    assert (hook, tid, pid, ts) == (0x0E20, 0x1234, 0x4242, START_QPC + 5)
    assert struct.unpack_from("<II", rec, 0x18) == (0, 0)  # KernelTime, UserTime
    p = "Q" if pointer_size == 8 else "I"
    assert struct.unpack_from(f"<II{p}{p}", rec, 0x20) == (0x200, 0x6B61654C, 0x100, entry)


@pytest.mark.parametrize("pointer_size", [8, 4])
def test_pool_record_perfinfo(pointer_size):
    w = TraceWriter(pointer_size)
    entry = 0xFFFF_A001_2345_6780 if pointer_size == 8 else 0x8123_4560
    w.pool(1, START_QPC + 5, 0x0E20, 0x200, "Leak", 0x100, entry, header="perfinfo")
    rec = only_record(w)
    marker, size, hook, ts = perfinfo(rec)
    assert marker == (0xC0110002 if pointer_size == 8 else 0xC0100002)
    assert size == 0x10 + (24 if pointer_size == 8 else 16) == len(rec)
    assert (hook, ts) == (0x0E20, START_QPC + 5)
    p = "Q" if pointer_size == 8 else "I"
    assert struct.unpack_from(f"<II{p}{p}", rec, 0x10) == (0x200, 0x6B61654C, 0x100, entry)
    assert rec[0x14:0x18] == b"Leak"


@pytest.mark.parametrize("pointer_size", [8, 4])
def test_pool_record_session_variant(pointer_size):
    w = TraceWriter(pointer_size)
    w.pool(0, START_QPC, 0x0E21, 0x21, 0x35306847, 0x80, 0x1000, 3, header="perfinfo")
    rec = only_record(w)
    marker, size, hook, _ = perfinfo(rec)
    body = 28 if pointer_size == 8 else 20
    assert size == 0x10 + body and hook == 0x0E21
    p = "Q" if pointer_size == 8 else "I"
    assert struct.unpack_from(f"<II{p}{p}I", rec, 0x10) == (0x21, 0x35306847, 0x80, 0x1000, 3)


def test_pool_record_system_and_compact_headers():
    w = TraceWriter()
    w.pool(0, START_QPC + 1, 0x0E22, 1, "File", 0xD8, 0x5000, header="system", tid=88, pid=4)
    w.pool(0, START_QPC + 2, 0x0E22, 1, "File", 0xD8, 0x6000, header="compact", tid=89, pid=5)
    (_, _, sys_rec), (_, _, compact_rec) = all_data_records(w.to_bytes())
    assert system(sys_rec) == (0xC0020002, 0x20 + 24, 0x0E22, 88, 4, START_QPC + 1)
    assert struct.unpack_from("<IIQQ", sys_rec, 0x20) == (1, 0x656C6946, 0xD8, 0x5000)
    assert system(compact_rec) == (0xC0040002, 0x18 + 24, 0x0E22, 89, 5, START_QPC + 2)
    assert struct.unpack_from("<IIQQ", compact_rec, 0x18) == (1, 0x656C6946, 0xD8, 0x6000)


@pytest.mark.parametrize("count", [1, 3, 7])
def test_pmc_counters_set_marker_bits_and_shift_payload(count):
    w = TraceWriter()
    counters = [0x1111_0000 + k for k in range(count)]
    w.pool(0, START_QPC, 0x0E20, 1, "Leak", 0x40, 0x7000, pmc=counters, header="perfinfo")
    rec = only_record(w)
    marker, size, _, _ = perfinfo(rec)
    assert marker == 0xC0110002 | count << 8
    assert (marker & 0x0700) >> 8 == count and marker & 0xFFFF & ~0x8700 == 2
    assert size == 0x10 + 8 * count + 24
    assert list(struct.unpack_from(f"<{count}Q", rec, 0x10)) == counters
    assert struct.unpack_from("<IIQQ", rec, 0x10 + 8 * count) == (1, 0x6B61654C, 0x40, 0x7000)


@pytest.mark.parametrize("pointer_size", [8, 4])
@pytest.mark.parametrize("n", [0, 1, 17, 192])
def test_stack_record(pointer_size, n):
    w = TraceWriter(pointer_size)
    frames = [0x80001000 + 8 * k for k in range(n)]
    w.stack(0, START_QPC + 3, START_QPC + 2, 4242, 4300, frames)
    rec = only_record(w)
    marker, size, hook, ts = perfinfo(rec)
    assert hook == 0x1820 and ts == START_QPC + 3 and marker & 0xFFFF == 2
    assert (size - 0x10 - 16) // pointer_size == n and (size - 0x10 - 16) % pointer_size == 0
    assert struct.unpack_from("<QII", rec, 0x10) == (START_QPC + 2, 4242, 4300)
    p = "Q" if pointer_size == 8 else "I"
    assert list(struct.unpack_from(f"<{n}{p}", rec, 0x20)) == frames


@pytest.mark.parametrize("pointer_size", [8, 4])
def test_stack_key_records(pointer_size):
    w = TraceWriter(pointer_size)
    p = "Q" if pointer_size == 8 else "I"
    w.stack_key_ref(0, START_QPC + 1, START_QPC, 10, 11, 0xABC0)
    w.stack_key_ref(0, START_QPC + 2, START_QPC, 10, 11, 0xABC0, user=True)
    w.stack_key_def(0, START_QPC + 3, 0xABC0, [1, 2, 3])
    w.stack_key_def(0, START_QPC + 4, 0xABC0, [4, 5], rundown=True)
    recs = [r for _, _, r in all_data_records(w.to_bytes())]
    assert [hook_of(r) for r in recs] == [0x1825, 0x1826, 0x1823, 0x1824]
    for r in recs[:2]:
        assert perfinfo(r)[1] == 0x10 + 16 + pointer_size
        assert struct.unpack_from(f"<QII{p}", r, 0x10) == (START_QPC, 10, 11, 0xABC0)
    assert perfinfo(recs[2])[1] == 0x10 + 4 * pointer_size
    assert struct.unpack_from(f"<4{p}", recs[2], 0x10) == (0xABC0, 1, 2, 3)
    assert struct.unpack_from(f"<3{p}", recs[3], 0x10) == (0xABC0, 4, 5)


@pytest.mark.parametrize(("pointer_size", "name_off"), [(8, 0x38), (4, 0x2C)])
def test_image_record(pointer_size, name_off):
    w = TraceWriter(pointer_size)
    w.image(
        0,
        START_QPC,
        0x030A,
        0x7000_0000,
        0x3000,
        4242,
        r"\Device\x.dll",
        checksum=0xC5,
        timedatestamp=0x5A5A,
        default_base=0x6000_0000,
        tid=9,
        hpid=4242,
    )
    rec = only_record(w)
    marker, size, hook, tid, pid, ts = system(rec)
    assert marker == (0xC0020003 if pointer_size == 8 else 0xC0010003)
    assert (hook, tid, pid, ts) == (0x030A, 9, 4242, START_QPC)
    body = rec[0x20:]
    p = "Q" if pointer_size == 8 else "I"
    assert struct.unpack_from(f"<{p}{p}III", body, 0) == (0x7000_0000, 0x3000, 4242, 0xC5, 0x5A5A)
    default_base_off = 0x20 if pointer_size == 8 else 0x18  # §2.3
    assert struct.unpack_from(f"<{p}", body, default_base_off)[0] == 0x6000_0000
    assert body[name_off:] == "\\Device\\x.dll\0".encode("utf-16-le")
    assert size == 0x20 + name_off + 2 * len("\\Device\\x.dll\0")


def test_image_record_perfinfo_header():
    w = TraceWriter()
    w.image(0, START_QPC, 0x1403, 0x1000, 0x2000, 0, "a", header="perfinfo")
    rec = only_record(w)
    assert perfinfo(rec)[:3] == (0xC0110003, 0x10 + 0x38 + 4, 0x1403)


@pytest.mark.parametrize("pointer_size", [8, 4])
def test_process_record(pointer_size):
    w = TraceWriter(pointer_size)
    sid = bytes([1, 2, 0, 0, 0, 0, 0, 5, 0x20, 0, 0, 0, 0x20, 2, 0, 0])  # S-1-5-32-544
    w.process(
        0,
        START_QPC,
        0x0301,
        4242,
        1000,
        "leakapp.exe",
        "leakapp --go",
        session_id=1,
        unique_key=0xFEED,
        exit_status=-1,
        sid=sid,
        flags=0x10,
    )
    w.process(0, START_QPC + 1, 0x0304, 4, 0, "System")
    (_, _, full), (_, _, plain) = all_data_records(w.to_bytes())
    marker, _, hook, _, pid, _ = system(full)
    assert marker & 0xFFFF == 4 and hook == 0x0301 and pid == 4242
    p = "Q" if pointer_size == 8 else "I"
    head = f"<{p}IIIi{p}I"
    fixed = struct.calcsize(head)  # 0x24 on x64 (§2.4)
    assert fixed == (0x24 if pointer_size == 8 else 0x1C)
    assert struct.unpack_from(head, full, 0x20) == (0xFEED, 4242, 1000, 1, -1, 0, 0x10)
    sid_at = 0x20 + fixed
    assert struct.unpack_from(f"<{p}", full, sid_at)[0] != 0  # TOKEN_USER form: non-zero Sid pointer
    sid_start = sid_at + 2 * pointer_size
    assert full[sid_start : sid_start + 8 + 4 * full[sid_start + 1]] == sid
    rest = full[sid_start + len(sid) :]
    assert rest == b"leakapp.exe\0" + "leakapp --go\0\0\0".encode("utf-16-le")
    # sid None: the 4-byte zero form, then the strings
    assert plain[0x20 + fixed : 0x20 + fixed + 4] == bytes(4)
    assert plain[0x20 + fixed + 4 :] == b"System\0" + "\0\0\0".encode("utf-16-le")


@pytest.mark.parametrize(("pointer_size", "fixed"), [(8, 0x48), (4, 0x2C)])
def test_thread_record(pointer_size, fixed):
    w = TraceWriter(pointer_size)
    w.thread(0, START_QPC, 0x0501, 4242, 4300, win32_start=0x7FF61234)
    w.thread(0, START_QPC + 1, 0x0503, 4, 8, name="worker")
    (_, _, start), (_, _, named) = all_data_records(w.to_bytes())
    marker, size, hook, tid, pid, _ = system(start)
    assert marker & 0xFFFF == 3 and (hook, tid, pid) == (0x0501, 4300, 4242)
    assert size == 0x20 + fixed
    assert struct.unpack_from("<II", start, 0x20) == (4242, 4300)
    # Win32StartAddress is the 6th pointer after the two u32s
    p = "Q" if pointer_size == 8 else "I"
    assert struct.unpack_from(f"<{p}", start, 0x20 + 8 + 5 * pointer_size)[0] == 0x7FF61234
    assert named[0x20 + fixed :] == "worker\0".encode("utf-16-le")


@pytest.mark.parametrize("pointer_size", [8, 4])
def test_ktc_records(pointer_size):
    w = TraceWriter(pointer_size)
    pdb_guid = uuid.UUID("ec83d8df-5559-46e0-b630-133ebd979266")
    w.ktc_image_id(0, START_QPC, 0x7771_0000, 0x1A000, 4, 0x5A5A, "ntdll.dll")
    w.ktc_rsds(0, START_QPC, 0x7771_0000, 4, pdb_guid, 2, "wntdll.pdb")
    (_, _, image_id), (_, _, rsds) = all_data_records(w.to_bytes())
    for rec, opcode in ((image_id, 0x00), (rsds, 0x24)):
        # FULL_HEADER: u16 Size; u8 Type; u8 MarkerFlags; u8 opcode; u8 Level; u16 Version; u32 TID; u32 PID;
        # i64 TimeStamp; GUID; u64 ProcessorTime
        size, htype, flags, op, _level, version, tid, pid, ts, guid, _ = struct.unpack_from("<HBBBBHIIq16sQ", rec)
        assert size == len(rec)
        assert (htype, flags) == ((0x14 if pointer_size == 8 else 0x0A), 0xC0)
        assert (op, version, tid, pid, ts) == (opcode, 2, 0xFFFFFFFF, 4, START_QPC)
        assert uuid.UUID(bytes_le=guid) == KTC
    p = "Q" if pointer_size == 8 else "I"
    assert struct.unpack_from(f"<{p}{p}II", image_id, 0x30) == (0x7771_0000, 0x1A000, 4, 0x5A5A)
    name_at = 0x30 + 2 * pointer_size + 8
    assert image_id[name_at:] == "ntdll.dll\0".encode("utf-16-le")
    # RSDS: GUID at +12 / Age at +28 / name at +32 on x64 (+8/+24/+28 on x86), §2.5
    g, a, n = (12, 28, 32) if pointer_size == 8 else (8, 24, 28)
    body = rsds[0x30:]
    assert uuid.UUID(bytes_le=body[g : g + 16]) == pdb_guid
    assert struct.unpack_from("<I", body, a)[0] == 2
    assert body[n:] == b"wntdll.pdb\0"


@pytest.mark.parametrize("pointer_size", [8, 4])
def test_event_header_record_with_extended_items(pointer_size):
    w = TraceWriter(pointer_size)
    provider = uuid.UUID("763fd754-7086-4dfe-95eb-c01a46faf4ca")
    activity = bytes(range(16))
    stack = struct.pack("<QQQ", 1, 0x7FF61000, 0x7FF62000)  # STACK_TRACE64: MatchId, 2 frames
    w.event(
        0,
        START_QPC,
        provider,
        80,
        opcode=1,
        version=2,
        level=5,
        keyword=0x8000,
        pid=4242,
        tid=4300,
        ext_items=[(1, activity), (6, stack), (3, b"\x01\x02\x03")],
        user_data=b"payload!!",
    )
    rec = only_record(w)
    size, htype, mflags, flags, _prop, tid, pid, ts, guid = struct.unpack_from("<HBBHHIIq16s", rec)
    assert size == len(rec) == 0x50 + 24 + 32 + 16 + 9
    assert (htype, mflags) == ((0x13 if pointer_size == 8 else 0x12), 0xC0)
    assert flags & 0x1 and flags & (0x40 if pointer_size == 8 else 0x20)
    assert (tid, pid, ts, uuid.UUID(bytes_le=guid)) == (4300, 4242, START_QPC, provider)
    event_id, version, _channel, level, opcode, _task, keyword = struct.unpack_from("<HBBBBHQ", rec, 0x28)
    assert (event_id, version, level, opcode, keyword) == (80, 2, 5, 1, 0x8000)
    # items: u16 ItemSize; u16 ExtType; u16 Linkage; u16 DataSize; data padded to 8 (§1.4)
    pos = 0x50
    seen = []
    while True:
        item_size, ext_type, linkage, data_size = struct.unpack_from("<HHHH", rec, pos)
        assert item_size == 8 + ((data_size + 7) & ~7)
        seen.append((ext_type, rec[pos + 8 : pos + 8 + data_size]))
        pos += item_size
        if not linkage & 1:
            break
    assert seen == [(1, activity), (6, stack), (3, b"\x01\x02\x03")]
    assert rec[pos:] == b"payload!!"


def test_event_header_without_items_has_no_extended_flag():
    w = TraceWriter()
    w.event(0, START_QPC, uuid.uuid4(), 1, user_data=b"x")
    rec = only_record(w)
    assert struct.unpack_from("<H", rec, 4)[0] & 0x1 == 0 and rec[0x50:] == b"x"


def test_classic_record():
    w = TraceWriter()
    g = uuid.UUID("9b79ee91-b5fd-41c0-a243-4248e266e9d0")
    w.classic(0, START_QPC + 9, g, 33, b"\x01\x02\x03", version=5, pid=7, tid=8)
    rec = only_record(w)
    assert struct.unpack_from("<HBBBBHIIq", rec) == (0x33, 0x14, 0xC0, 33, 0, 5, 8, 7, START_QPC + 9)
    assert uuid.UUID(bytes_le=rec[0x18:0x28]) == g and rec[0x30:] == b"\x01\x02\x03"


def test_raw_record_is_written_unchanged():
    w = TraceWriter()
    raw = struct.pack("<IHHq", 0xC0110002, 0x13, 0x0F2E, START_QPC) + b"abc"
    w.raw(0, START_QPC, raw)
    data = w.to_bytes()
    h = walk_buffers(data)[1]
    assert data[h["off"] + BUF_HDR : h["off"] + BUF_HDR + 0x18] == raw + bytes(5)  # zero padded to 8
    assert h["Offset"] == BUF_HDR + 0x18


# --- buffers ---------------------------------------------------------------------------------------------


def test_alignment_padding_tail_and_offsets():
    w = full_trace(8, buffer_size=4096)
    data = w.to_bytes()
    bufs = walk_buffers(data)
    assert len(data) == 4096 * len(bufs)
    assert len(bufs) > 5
    total = 0
    for h in bufs:
        assert h["BufferSize"] == 4096
        assert h["Offset"] == h["SavedOffset"] and h["Offset"] % 8 == 0
        start, end = h["off"] + BUF_HDR, h["off"] + h["Offset"]
        assert data[end : h["off"] + 4096] == b"\xff" * (h["off"] + 4096 - end)  # 0xFF tail
        recs = records(data[start:end])
        total += len(recs)
        for pos, rec in recs:
            assert pos % 8 == 0
            pad = -len(rec) % 8
            assert data[start + pos + len(rec) : start + pos + len(rec) + pad] == bytes(pad)
        if h is not bufs[0]:
            assert (h["BufferFlag"], h["BufferType"], h["State"]) == (0x20, 0, 3)
    assert total == w.record_count
    # buffers are filled greedily: the first record of a CPU's next buffer would not have fit
    for cpu in (0, 1):
        mine = [h for h in bufs[1:] if h["ProcessorIndex"] == cpu]
        assert len(mine) > 1
        for h, nxt in zip(mine, mine[1:], strict=False):
            first = records(buffer_area(data, nxt))[0][1]
            assert h["Offset"] + ((len(first) + 7) & ~7) > 4096
    # Size excludes the padding: the session pool record (0x20 + 28 = 60 bytes) is not a multiple of 8
    assert any(hook_of(r) == 0x0E23 and system(r)[1] == 60 for _, _, r in all_data_records(data))


def test_buffers_interleave_cpus_in_flush_order():
    w = full_trace(8, buffer_size=2048)
    data = w.to_bytes()
    bufs = walk_buffers(data)[1:]
    cpus = [h["ProcessorIndex"] for h in bufs]
    assert set(cpus) == {0, 1}
    assert cpus != sorted(cpus), "buffers are grouped by CPU instead of interleaved"
    seqs = [h["SequenceNumber"] for h in bufs]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] == 1
    # file order = flush order = timestamp of each buffer's last record
    last_ts = []
    per_cpu_ts: dict[int, list[int]] = {0: [], 1: []}
    global_ts = []
    for h in bufs:
        stamps = [timestamp_of(r) for _, r in records(buffer_area(data, h))]
        last_ts.append(stamps[-1])
        assert h["TimeStamp"] == stamps[-1]
        per_cpu_ts[h["ProcessorIndex"]] += stamps
        global_ts += stamps
    assert last_ts == sorted(last_ts)
    for stamps in per_cpu_ts.values():
        assert stamps == sorted(stamps)  # never decreasing within a CPU (§1.7)
    assert global_ts != sorted(global_ts)  # ...but the file as a whole is not in time order


def test_records_are_sorted_per_cpu_stably():
    w = TraceWriter()
    w.pool(0, START_QPC + 30, 0x0E20, 1, "CCCC", 1, 0x30)
    w.pool(0, START_QPC + 10, 0x0E20, 1, "AAAA", 1, 0x10)
    w.pool(0, START_QPC + 20, 0x0E20, 1, "BBB1", 1, 0x21)
    w.pool(0, START_QPC + 20, 0x0E20, 1, "BBB2", 1, 0x22)
    tags = [r[0x24:0x28] for _, _, r in all_data_records(w.to_bytes())]  # SYSTEM header: payload at 0x20
    assert tags == [b"AAAA", b"BBB1", b"BBB2", b"CCCC"]


def test_flag_buffer():
    w = full_trace(8, buffer_size=2048)
    w.flag_buffer(1, 2, 0x2)
    w.flag_buffer(1, 2, 0x4)
    w.flag_buffer(0, 0, 0x4)
    bufs = walk_buffers(w.to_bytes())[1:]
    by_cpu: dict[int, list[int]] = {0: [], 1: []}
    for h in bufs:
        by_cpu[h["ProcessorIndex"]].append(h["BufferFlag"])
    assert by_cpu[1][2] == 0x26 and by_cpu[0][0] == 0x24
    assert sum(f != 0x20 for flags in by_cpu.values() for f in flags) == 2
    w.flag_buffer(0, 10_000, 0x2)
    with pytest.raises(ValueError, match="flag_buffer"):
        w.to_bytes()


# --- compressed traces -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pointer_size", [8, 4])
def test_compressed_trace(pointer_size):
    plain = full_trace(pointer_size, buffer_size=4096).to_bytes()
    w = full_trace(pointer_size, compressed=True, buffer_size=4096)
    data = w.to_bytes()
    bufs = walk_buffers(data)  # also asserts that the last buffer ends exactly at EOF
    hdr = bufs[0]
    assert hdr["BufferSize"] % 0x200 == 0 and hdr["BufferSize"] < 4096
    assert (hdr["BufferFlag"], hdr["BufferType"]) == (0x01, 4)
    lh = logfile_header(records(buffer_area(data, hdr))[0][1], pointer_size)
    assert lh["LogFileMode"] == 0x04010001
    assert lh["BuffersWritten"] == len(bufs)
    assert lh["BufferSize"] == 4096
    assert lh["Version"] & 0xFFFF == 0x000A and lh["Version"] >> 16 == 0x0002  # layout 2.0
    plain_bufs = walk_buffers(plain)
    assert len(plain_bufs) == len(bufs)
    for h, p in zip(bufs[1:], plain_bufs[1:], strict=True):
        assert h["BufferFlag"] & 0x60 == 0x60 and h["State"] & 0xFFFF == 3
        assert h["BufferSize"] < h["Offset"], "record area did not shrink"
        area = buffer_area(data, h)  # pyfwnt with the exact uncompressed size
        assert len(area) == h["Offset"] - BUF_HDR == h["SavedOffset"] - BUF_HDR
        # same records, same per-buffer split, same order as the uncompressed layout
        assert area == buffer_area(plain, p)
        assert (h["ProcessorIndex"], h["SequenceNumber"]) == (p["ProcessorIndex"], p["SequenceNumber"])
    assert sum(len(records(buffer_area(data, h))) for h in bufs) == w.record_count


# --- validation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda w: w.stack(0, START_QPC, START_QPC, 1, 2, list(range(193))),
        lambda w: w.stack_key_def(0, START_QPC, 1, list(range(193))),
        lambda w: w.pool(0, START_QPC, 0x0E24, 1, "Leak", 1, 1),
        lambda w: w.pool(0, START_QPC, 0x0E20, 1, "Lea", 1, 1),
        lambda w: w.pool(0, START_QPC, 0x0E20, 1, "Leaks", 1, 1),
        lambda w: w.pool(0, START_QPC, 0x0E20, 1, "Leak", 1, 1, 5),  # SessionId on a non-session hook
        lambda w: w.pool(0, START_QPC, 0x0E20, 1, "Leak", 1, 1, tid=5, header="perfinfo"),  # PERFINFO: no TID
        lambda w: w.pool(0, START_QPC, 0x0E20, 1, "Leak", 1, 1, header="full"),
        lambda w: w.pool(0, START_QPC, 0x0E20, 1, "Leak", 1, 1, pmc=[0] * 8),
        lambda w: w.pool(0, START_QPC, 0x0E20, 1, "Leak", 1, 1 << 32),  # pointer too wide for x86
        lambda w: w.pool(2, START_QPC, 0x0E20, 1, "Leak", 1, 1),  # no such CPU
        lambda w: w.image(0, START_QPC, 0x1401, 1, 1, 0, "x"),
        lambda w: w.process(0, START_QPC, 0x0305, 1, 1, "x"),
        lambda w: w.process(0, START_QPC, 0x0301, 1, 1, "x", sid=b"\x01\x05\0\0"),
        lambda w: w.thread(0, START_QPC, 0x0505, 1, 1),
        lambda w: w.ktc_rsds(0, START_QPC, 1, 1, uuid.uuid4(), 1, "x.pdb", opcode=0x40),
        lambda w: w.header_extension((0,) * 7),
        lambda w: w.raw(0, START_QPC, b""),
    ],
)
def test_invalid_input_raises(call):
    w = TraceWriter(4, 2)
    with pytest.raises(ValueError):
        call(w)
    assert w.record_count == 2  # nothing was added


def test_record_larger_than_a_buffer_is_rejected():
    w = TraceWriter(buffer_size=1024)
    w.raw(0, START_QPC, b"\0" * 1000)
    with pytest.raises(ValueError, match="does not fit"):
        w.to_bytes()


@pytest.mark.parametrize("kw", [{"pointer_size": 2}, {"cpus": 0}, {"buffer_size": 1001}, {"os_version": (10,)}])
def test_invalid_constructor_arguments(kw):
    with pytest.raises(ValueError):
        TraceWriter(**kw)


def test_save(tmp_path):
    w = full_trace(8)
    path = tmp_path / "t.etl"
    w.save(path)
    assert path.read_bytes() == w.to_bytes()


# --- an independent reader -------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("pointer_size", [8, 4])
def test_dissect_reads_every_record(pointer_size, compressed):
    etl_mod = pytest.importorskip("dissect.etl.etl")
    w = full_trace(pointer_size, compressed=compressed, buffer_size=4096)
    data = w.to_bytes()
    etl = etl_mod.ETL(io.BytesIO(data))
    assert etl.logfile_header.pointer_size == pointer_size
    assert etl.logfile_header.buffers_written == len(walk_buffers(data))
    hooks: dict[int, int] = {}
    classic = 0
    total = 0
    for rec in etl:
        total += 1
        hook = getattr(rec.header, "hook_id", None)
        if hook is None:
            classic += 1
            assert rec.header.provider_id == KTC
        else:
            hooks[hook] = hooks.get(hook, 0) + 1
    assert total == w.record_count
    assert classic == 2
    assert hooks == {
        0x0000: 1,
        0x0005: 1,
        0x1403: 1,
        0x1404: 1,
        0x0303: 1,
        0x0301: 1,
        0x0503: 1,
        0x0501: 1,
        0x0E20: 400,
        0x1820: 400,
        0x0E23: 80,
        0x1825: 80,
        0x1826: 80,
        0x1824: 1,
    }


def test_dissect_sees_payload_and_time():
    etl_mod = pytest.importorskip("dissect.etl.etl")
    w = TraceWriter(perf_freq=10_000_000)
    w.pool(0, START_QPC + 10_000_000, 0x0E20, 0x200, "Leak", 0x100, 0xFFFF_A000_0000_1000)  # 1 s after start
    recs = list(etl_mod.ETL(io.BytesIO(w.to_bytes())))
    pool = recs[-1].header
    assert pool.hook_id == 0x0E20
    assert bytes(pool.payload) == struct.pack("<IIQQ", 0x200, 0x6B61654C, 0x100, 0xFFFF_A000_0000_1000)
    start = recs[0].header.timestamp
    assert (pool.timestamp - start).total_seconds() == pytest.approx(1.0)
