"""Byte layouts of every structure the collector hands to Windows (etw-collector.md §1.2, §2, §3.2, §4.2, §9),
checked against the documented sizes and offsets, a ctypes mirror of the C declarations, and the
reference's worked examples."""

from __future__ import annotations

import ctypes as ct
import struct
import uuid

import pytest

from pooltrace.collector import structs as S
from pooltrace.collector.config import constants
from pooltrace.collector.plan import RecordRequest, make_plan
from tests.collector_fake import FakeWindows, PoolTag

POOL_GUID = uuid.UUID("0268a8b6-74fd-4302-9dd0-6e8f1795c0cf")
SYSTEM_TRACE_CONTROL = uuid.UUID("9e814aad-3204-11d2-9a82-006008a86939")


class WNODE_HEADER(ct.Structure):
    _fields_ = [("BufferSize", ct.c_uint32), ("ProviderId", ct.c_uint32), ("HistoricalContext", ct.c_uint64),
                ("TimeStamp", ct.c_int64), ("Guid", ct.c_uint8 * 16), ("ClientContext", ct.c_uint32),
                ("Flags", ct.c_uint32)]


class EVENT_TRACE_PROPERTIES(ct.Structure):
    _fields_ = [("Wnode", WNODE_HEADER)] + [(n, ct.c_uint32) for n in (
        "BufferSize", "MinimumBuffers", "MaximumBuffers", "MaximumFileSize", "LogFileMode", "FlushTimer",
        "EnableFlags", "AgeLimit", "NumberOfBuffers", "FreeBuffers", "EventsLost", "BuffersWritten",
        "LogBuffersLost", "RealTimeBuffersLost")] + [("LoggerThreadId", ct.c_void_p),
                                                      ("LogFileNameOffset", ct.c_uint32),
                                                      ("LoggerNameOffset", ct.c_uint32)]


def test_event_trace_properties_offsets_match_the_reference_table():
    assert S.PROPERTIES_SIZE == 0x78 and S.WNODE_SIZE == 0x30
    assert S.WNODE == {"BufferSize": 0, "ProviderId": 4, "HistoricalContext": 8, "TimeStamp": 0x10, "Guid": 0x18,
                       "ClientContext": 0x28, "Flags": 0x2C}
    table = {"BufferSize": 0x30, "MinimumBuffers": 0x34, "MaximumBuffers": 0x38, "MaximumFileSize": 0x3C,
             "LogFileMode": 0x40, "FlushTimer": 0x44, "EnableFlags": 0x48, "AgeLimit": 0x4C, "NumberOfBuffers": 0x50,
             "FreeBuffers": 0x54, "EventsLost": 0x58, "BuffersWritten": 0x5C, "LogBuffersLost": 0x60,
             "RealTimeBuffersLost": 0x64, "LoggerThreadId": 0x68}
    assert table == S.PROPERTIES
    assert S.NAME_OFFSETS == {"LogFileNameOffset": 0x70, "LoggerNameOffset": 0x74}


@pytest.mark.skipif(ct.sizeof(ct.c_void_p) != 8, reason="the ctypes mirror needs a 64-bit Python")
def test_event_trace_properties_offsets_match_a_ctypes_mirror_of_the_declaration():
    assert ct.sizeof(WNODE_HEADER) == S.WNODE_SIZE
    assert ct.sizeof(EVENT_TRACE_PROPERTIES) == S.PROPERTIES_SIZE
    for name, off in S.WNODE.items():
        assert getattr(WNODE_HEADER, name).offset == off, name
    for name, off in {**S.PROPERTIES, **S.NAME_OFFSETS}.items():
        assert getattr(EVENT_TRACE_PROPERTIES, name).offset == off, name


def test_start_properties_bytes():
    plan = make_plan(RecordRequest(output=None, tags=("Leak",)), (10, 0, 22631), cpus=8)
    buf = plan.start_properties("C:\\traces\\leak.etl.partial")
    u32 = lambda off: struct.unpack_from("<I", buf, off)[0]  # noqa: E731
    assert u32(0) == len(buf)  # Wnode.BufferSize = the whole allocation
    assert buf[0x18:0x28] == uuid.UUID("8f9c5e2a-3d71-4b6e-9a0c-5e1f27d4b6a3").bytes_le
    assert u32(0x28) == 1  # ClientContext: QPC
    assert u32(0x2C) == 0x00020000  # WNODE_FLAG_TRACED_GUID
    assert (u32(0x30), u32(0x34), u32(0x38)) == (1024, 64, 512)
    assert u32(0x3C) == 4096  # MaximumFileSize: the default cap in MB
    assert u32(0x40) == 0x02000001  # SEQUENTIAL | SYSTEM_LOGGER_MODE
    assert u32(0x44) == 1 and u32(0x48) == 0x7  # FlushTimer; EnableFlags PROCESS|THREAD|IMAGE_LOAD
    assert buf[0x4C:0x68] == bytes(0x68 - 0x4C)  # outputs zero
    file_off, name_off = u32(0x70), u32(0x74)
    assert name_off == 0x78
    assert buf[name_off:name_off + 20] == "pooltrace".encode("utf-16-le") + b"\0\0"
    path = "C:\\traces\\leak.etl.partial".encode("utf-16-le") + b"\0\0"
    assert buf[file_off:file_off + len(path)] == path
    assert file_off >= name_off + 2 * 1024  # room for a name StartTrace copies in


def test_control_properties_leave_room_for_both_names_and_parse_back():
    buf = S.build_properties()
    assert len(buf) == 0x78 + 2 * 2048 and struct.unpack_from("<I", buf, 0)[0] == len(buf)
    assert struct.unpack_from("<II", buf, 0x70) == (0x78 + 2048, 0x78)
    fake = FakeWindows(events_lost=3, buffers_written=11, log_buffers_lost=2)
    fake.running("pooltrace", log_file="D:\\x.etl.partial")
    fake._write_stats(buf, fake.sessions["pooltrace"])
    stats = S.SessionStats.parse(buf)
    assert (stats.events_lost, stats.buffers_written, stats.log_buffers_lost) == (3, 11, 2)
    assert stats.log_file == "D:\\x.etl.partial" and stats.logger_name == "pooltrace"


def test_classic_event_id_array():
    data = S.classic_event_ids([(POOL_GUID, 0x20), (POOL_GUID, 0x21)])
    assert len(data) == 2 * 24 == 2 * S.CLASSIC_EVENT_ID_SIZE
    assert data[:16] == bytes.fromhex("b6a86802fd7402439dd06e8f1795c0cf")  # GUID in memory order
    assert data[16:24] == b"\x20" + bytes(7) and data[40:48] == b"\x21" + bytes(7)


def test_group_mask_and_its_48_byte_native_form():
    masks = constants().group_masks
    assert masks == (0x7, 0x40, 0, 0, 0, 0, 0, 0)  # PROC_THREAD+LOADER in [0], PERF_POOL 0x20000040 in [1]
    gm = S.group_mask(masks)
    assert len(gm) == 32 and gm == struct.pack("<8I", 7, 0x40, 0, 0, 0, 0, 0, 0)
    info = S.perf_information(1, 0x23, masks)
    assert len(info) == 48
    assert info[:16] == struct.pack("<IIQ", 1, 0, 0x23) and info[16:] == gm
    assert S.parse_group_mask_information(info) == masks
    with pytest.raises(ValueError):
        S.group_mask([1, 2])


def test_tag_filter_and_stack_hook_information():
    tags = S.perf_information(10, 0xFFFF, [0x6B61654C])
    assert len(tags) == 20 and tags == struct.pack("<IIQI", 10, 0, 0xFFFF, 0x6B61654C)
    assert len(S.perf_information(10, 1, [1, 2, 3, 4])) == 32
    hooks = S.perf_information(6, 0x23, [0x0E20, 0x0E21, 0x0E22, 0x0E23])
    assert len(hooks) == 32 and struct.unpack("<IIQ4I", hooks) == (6, 0, 0x23, 0x0E20, 0x0E21, 0x0E22, 0x0E23)


def test_read_back_lists_take_their_count_from_the_returned_length():
    buf = bytearray(S.perf_information(6, 0x23, [0] * 8))
    struct.pack_into("<3I", buf, 16, 0x0E20, 0x0E21, 0x0E22)
    assert S.parse_ulong_list(buf, 16 + 12) == (0x0E20, 0x0E21, 0x0E22)
    assert S.parse_ulong_list(buf, 16) == ()
    with pytest.raises(ValueError):
        S.parse_ulong_list(buf, 16 + 4 * 9)  # more than the buffer holds


class LUID_AND_ATTRIBUTES(ct.Structure):
    _fields_ = [("LowPart", ct.c_uint32), ("HighPart", ct.c_int32), ("Attributes", ct.c_uint32)]


class TOKEN_PRIVILEGES(ct.Structure):
    _fields_ = [("PrivilegeCount", ct.c_uint32), ("Privileges", LUID_AND_ATTRIBUTES * 1)]


def test_token_privileges_match_the_winnt_declaration():
    # winnt.h: LUID {DWORD LowPart; LONG HighPart}, LUID_AND_ATTRIBUTES {LUID Luid; DWORD Attributes} (12 bytes,
    # 4-aligned), TOKEN_PRIVILEGES {DWORD PrivilegeCount; LUID_AND_ATTRIBUTES Privileges[ANYSIZE_ARRAY]}
    assert ct.sizeof(LUID_AND_ATTRIBUTES) == 12 and ct.sizeof(TOKEN_PRIVILEGES) == 16 == S.TOKEN_PRIVILEGES_ONE.size
    data = S.token_privileges(0x00000001_00000014)  # SeDebugPrivilege is LUID 20 (SE_DEBUG_PRIVILEGE)
    mirror = TOKEN_PRIVILEGES.from_buffer_copy(data)
    assert mirror.PrivilegeCount == 1 and mirror.Privileges[0].LowPart == 0x14 and mirror.Privileges[0].HighPart == 1
    assert mirror.Privileges[0].Attributes == 2  # SE_PRIVILEGE_ENABLED


def test_pool_tag_information_parses_what_the_kernel_returns():
    fake = FakeWindows(pool_tags=[PoolTag(b"Leak", 10, 4, 600, 7, 1, 2 ** 33), PoolTag(b"Irp ", 1, 1, 0, 0, 0, 0)])
    got = S.parse_pool_tag_information(fake.pool_tag_bytes())
    assert got[0] == S.PoolTagCounters(0x6B61654C, 10, 4, 600, 7, 1, 2 ** 33)
    assert got[1].tag == int.from_bytes(b"Irp ", "little")
    assert S.build_pool_tag_information(got) == fake.pool_tag_bytes()
    assert len(fake.pool_tag_bytes()) == 8 + 2 * 40
    with pytest.raises(ValueError):
        S.parse_pool_tag_information(fake.pool_tag_bytes()[:-1])


@pytest.mark.parametrize(("acp", "name"), [(1252, "Tr\u00e4ger.sys"),
                                           (1251, "\u0434\u0440\u0430\u0439\u0432\u0435\u0440.sys"),
                                           (932, "\u30c9\u30e9\u30a4\u30d0.sys")])
def test_module_information_parses_what_the_kernel_returns_in_the_ansi_code_page(acp, name):
    base = 0xFFFFF80412000000
    fake = FakeWindows(acp=acp, modules=[(base, 0x1046000, "\\SystemRoot\\system32\\ntoskrnl.exe"),
                                         (base + 0x7A40000, 0x8000, f"\\??\\C:\\drivers\\{name}")])
    raw = fake.module_bytes()
    assert len(raw) == 8 + 2 * 296
    got = S.parse_module_information(raw, acp)
    assert got == [S.LoadedModule(base, 0x1046000, "\\SystemRoot\\system32\\ntoskrnl.exe"),
                   S.LoadedModule(base + 0x7A40000, 0x8000, f"\\??\\C:\\drivers\\{name}")]
    assert S.parse_module_information(S.build_module_information(got, acp), acp) == got
    assert S.ansi_codec(99999) == "cp1252"  # a code page Python lacks: the Western default
