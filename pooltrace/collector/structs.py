"""Byte layouts of every structure the collector hands to Windows or reads back, built with ``struct`` so
they are identical on any OS and testable byte for byte (etw-collector.md §1.2, §2, §3.2, §4.2, §9).

x64 only (the recorder runs on 64-bit Windows with 64-bit Python; see providers/session.toml): little-endian,
MSVC alignment, 8-byte pointers and handles.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# --- EVENT_TRACE_PROPERTIES (§1.2) --------------------------------------------------------------------
PROPERTIES_SIZE = 0x78  # sizeof(EVENT_TRACE_PROPERTIES) on x64 and x86
WNODE_SIZE = 0x30
WNODE = {"BufferSize": 0x00, "ProviderId": 0x04, "HistoricalContext": 0x08, "TimeStamp": 0x10, "Guid": 0x18,
         "ClientContext": 0x28, "Flags": 0x2C}
PROPERTIES = {
    "BufferSize": 0x30, "MinimumBuffers": 0x34, "MaximumBuffers": 0x38, "MaximumFileSize": 0x3C,
    "LogFileMode": 0x40, "FlushTimer": 0x44, "EnableFlags": 0x48, "AgeLimit": 0x4C, "NumberOfBuffers": 0x50,
    "FreeBuffers": 0x54, "EventsLost": 0x58, "BuffersWritten": 0x5C, "LogBuffersLost": 0x60,
    "RealTimeBuffersLost": 0x64, "LoggerThreadId": 0x68,
}
# LoggerThreadId is a HANDLE (8 bytes on x64), so the name offsets follow at 0x70 and 0x74.
NAME_OFFSETS = {"LogFileNameOffset": 0x70, "LoggerNameOffset": 0x74}
NAME_ROOM_CHARS = 1024  # UTF-16 characters reserved for the logger name and for the log file name


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _utf16z(text: str) -> bytes:
    return text.encode("utf-16-le") + b"\0\0"


def _put(buf: bytearray, offset: int, fmt: str, value: int) -> None:
    struct.pack_into("<" + fmt, buf, offset, value)


def build_properties(*, guid: uuid.UUID | None = None, logger_name: str = "",
                     log_file: str | None = None, wnode_flags: int = 0, client_context: int = 0,
                     buffer_size_kb: int = 0, minimum_buffers: int = 0, maximum_buffers: int = 0,
                     maximum_file_size_mb: int = 0, log_file_mode: int = 0, flush_timer_s: int = 0,
                     enable_flags: int = 0) -> bytearray:
    """EVENT_TRACE_PROPERTIES followed by room for the logger name and the log file name.

    The same shape serves StartTrace (all settings) and ControlTrace (all zero but the sizes, offsets and
    Wnode.Guid, so Windows can return the statistics and both names in it)."""
    name_off = PROPERTIES_SIZE
    name_room = 2 * max(NAME_ROOM_CHARS, len(logger_name) + 1)
    file_off = name_off + name_room
    file_room = 2 * max(NAME_ROOM_CHARS, len(log_file or "") + 1)
    total = _align(file_off + file_room, 8)
    buf = bytearray(total)
    _put(buf, WNODE["BufferSize"], "I", total)
    if guid is not None:
        buf[WNODE["Guid"]:WNODE["Guid"] + 16] = guid.bytes_le
    _put(buf, WNODE["ClientContext"], "I", client_context)
    _put(buf, WNODE["Flags"], "I", wnode_flags)
    _put(buf, PROPERTIES["BufferSize"], "I", buffer_size_kb)
    _put(buf, PROPERTIES["MinimumBuffers"], "I", minimum_buffers)
    _put(buf, PROPERTIES["MaximumBuffers"], "I", maximum_buffers)
    _put(buf, PROPERTIES["MaximumFileSize"], "I", maximum_file_size_mb)
    _put(buf, PROPERTIES["LogFileMode"], "I", log_file_mode)
    _put(buf, PROPERTIES["FlushTimer"], "I", flush_timer_s)
    _put(buf, PROPERTIES["EnableFlags"], "I", enable_flags)
    _put(buf, NAME_OFFSETS["LoggerNameOffset"], "I", name_off)
    _put(buf, NAME_OFFSETS["LogFileNameOffset"], "I", file_off)
    name = _utf16z(logger_name)
    buf[name_off:name_off + len(name)] = name
    if log_file:
        path = _utf16z(log_file)
        buf[file_off:file_off + len(path)] = path
    return buf


def _read_utf16z(buf: bytes, offset: int) -> str:
    if not offset or offset >= len(buf):
        return ""
    end = offset
    while end + 1 < len(buf) and buf[end:end + 2] != b"\0\0":
        end += 2
    return bytes(buf[offset:end]).decode("utf-16-le", errors="replace")


@dataclass(frozen=True)
class SessionStats:
    """What ControlTrace (QUERY or STOP) returns in the properties buffer."""

    buffer_size_kb: int
    number_of_buffers: int
    free_buffers: int
    events_lost: int
    buffers_written: int
    log_buffers_lost: int
    real_time_buffers_lost: int
    log_file_mode: int
    maximum_file_size_mb: int
    logger_name: str
    log_file: str

    @classmethod
    def parse(cls, buf: bytes) -> SessionStats:
        def u32(name: str) -> int:
            return struct.unpack_from("<I", buf, PROPERTIES[name])[0]

        name_off = struct.unpack_from("<I", buf, NAME_OFFSETS["LoggerNameOffset"])[0]
        file_off = struct.unpack_from("<I", buf, NAME_OFFSETS["LogFileNameOffset"])[0]
        return cls(u32("BufferSize"), u32("NumberOfBuffers"), u32("FreeBuffers"), u32("EventsLost"),
                   u32("BuffersWritten"), u32("LogBuffersLost"), u32("RealTimeBuffersLost"), u32("LogFileMode"),
                   u32("MaximumFileSize"), _read_utf16z(buf, name_off), _read_utf16z(buf, file_off))


# --- TraceSetInformation payloads (§2, §3.2) ---------------------------------------------------------
CLASSIC_EVENT_ID_SIZE = 24
GROUP_MASK_SIZE = 32


def classic_event_ids(events: Iterable[tuple[uuid.UUID, int]]) -> bytes:
    """CLASSIC_EVENT_ID[n]: {GUID EventGuid; UCHAR Type; UCHAR Reserved[7]}, 24 bytes each."""
    return b"".join(guid.bytes_le + struct.pack("<B7x", event_type) for guid, event_type in events)


def group_mask(masks: Sequence[int]) -> bytes:
    """PERFINFO_GROUPMASK: ULONG Masks[8]."""
    if len(masks) != 8:
        raise ValueError("a group mask has 8 ULONGs")
    return struct.pack("<8I", *masks)


# --- NtSetSystemInformation(SystemPerformanceTraceInformation, ...) (§2, §3.2, §4.2.2) -------------------
PERF_INFO_HEADER = struct.Struct("<I4xQ")  # EventTraceInformationClass; pad; TRACEHANDLE TraceHandle


def perf_information(info_class: int, handle: int, ulongs: Sequence[int]) -> bytes:
    """EVENT_TRACE_*_INFORMATION: the 16-byte header then ULONGs. Class 1 (group mask) is 48 bytes,
    class 6 (stack tracing: hook ids) and class 10 (pool-tag filter: tags) are 16 + 4n."""
    return PERF_INFO_HEADER.pack(info_class, handle) + struct.pack(f"<{len(ulongs)}I", *ulongs)


def parse_group_mask_information(buf: bytes) -> tuple[int, ...]:
    """The masks of a queried EVENT_TRACE_GROUPMASK_INFORMATION (48 bytes)."""
    return struct.unpack_from("<8I", buf, PERF_INFO_HEADER.size)


def parse_ulong_list(buf: bytes, returned: int) -> tuple[int, ...]:
    """The ULONGs of a queried class 6 (hook ids) or class 10 (tags): the kernel says how many through the
    returned length, 16 + 4n (EtwQueryPerformanceTraceInformation, 11-24H2 pseudocode)."""
    n = (returned - PERF_INFO_HEADER.size) // 4
    if n < 0 or PERF_INFO_HEADER.size + 4 * n > len(buf):
        raise ValueError(f"returned length {returned} does not fit a {len(buf)}-byte buffer")
    return struct.unpack_from(f"<{n}I", buf, PERF_INFO_HEADER.size)


# --- TOKEN_PRIVILEGES for AdjustTokenPrivileges (winnt.h) -------------------------------------------------
TOKEN_PRIVILEGES_ONE = struct.Struct("<IIiI")  # PrivilegeCount; LUID {LowPart; HighPart}; Attributes = 16 bytes
SE_PRIVILEGE_ENABLED = 0x00000002


def token_privileges(luid: int) -> bytes:
    """TOKEN_PRIVILEGES with one LUID_AND_ATTRIBUTES (LUID 8 bytes + Attributes 4, 4-byte aligned) enabling
    the privilege."""
    return TOKEN_PRIVILEGES_ONE.pack(1, luid & 0xFFFFFFFF, luid >> 32, SE_PRIVILEGE_ENABLED)


# --- NtQuerySystemInformation results -------------------------------------------------------------------
@dataclass(frozen=True)
class PoolTagCounters:
    """SYSTEM_POOLTAG: the kernel's per-tag counters (what poolmon shows)."""

    tag: int
    paged_allocs: int
    paged_frees: int
    paged_used: int
    nonpaged_allocs: int
    nonpaged_frees: int
    nonpaged_used: int


# SYSTEM_POOLTAG_INFORMATION {ULONG Count; SYSTEM_POOLTAG TagInfo[]}: the array is aligned to the SIZE_T
# inside SYSTEM_POOLTAG, so it starts at 8, with 40-byte entries (§5.1).
POOLTAG_START, POOLTAG_ENTRY = 8, struct.Struct("<III4xQIIQ")


def parse_pool_tag_information(buf: bytes) -> list[PoolTagCounters]:
    start, entry = POOLTAG_START, POOLTAG_ENTRY
    (count,) = struct.unpack_from("<I", buf, 0)
    if start + count * entry.size > len(buf):
        raise ValueError(f"SYSTEM_POOLTAG_INFORMATION: {count} entries do not fit in {len(buf)} bytes")
    return [PoolTagCounters(*entry.unpack_from(buf, start + i * entry.size)) for i in range(count)]


def build_pool_tag_information(entries: Sequence[PoolTagCounters]) -> bytes:
    """The inverse of parse_pool_tag_information (what NtQuerySystemInformation class 22 returns)."""
    start, entry = POOLTAG_START, POOLTAG_ENTRY
    out = bytearray(start + len(entries) * entry.size)
    struct.pack_into("<I", out, 0, len(entries))
    for i, e in enumerate(entries):
        entry.pack_into(out, start + i * entry.size, e.tag, e.paged_allocs, e.paged_frees, e.paged_used,
                        e.nonpaged_allocs, e.nonpaged_frees, e.nonpaged_used)
    return bytes(out)


@dataclass(frozen=True)
class LoadedModule:
    """RTL_PROCESS_MODULE_INFORMATION: one loaded kernel image."""

    base: int
    size: int
    path: str  # as the kernel keeps it: \SystemRoot\..., \??\C:\..., \Device\...


# RTL_PROCESS_MODULES {ULONG NumberOfModules; RTL_PROCESS_MODULE_INFORMATION Modules[]} with
# {HANDLE Section; PVOID MappedBase; PVOID ImageBase; ULONG ImageSize; ULONG Flags; USHORT LoadOrderIndex,
#  InitOrderIndex, LoadCount, OffsetToFileName; UCHAR FullPathName[256]} (phnt ntldr.h; 296 bytes on x64,
# the array 8-aligned after the count).
MODULES_START, MODULE_ENTRY = 8, struct.Struct("<QQQIIHHHH256s")


def ansi_codec(code_page: int) -> str:
    """The Python codec for a Windows ANSI code page (GetACP); cp1252 when Python does not know it."""
    import codecs

    for name in (f"cp{code_page}", "cp1252"):
        try:
            return codecs.lookup(name).name
        except LookupError:
            continue
    raise AssertionError


def parse_module_information(buf: bytes, code_page: int = 1252) -> list[LoadedModule]:
    """FullPathName is a char array in the ANSI code page (not ASCII): decoded with ``code_page``."""
    start, entry = MODULES_START, MODULE_ENTRY
    (count,) = struct.unpack_from("<I", buf, 0)
    if start + count * entry.size > len(buf):
        raise ValueError(f"RTL_PROCESS_MODULES: {count} modules do not fit in {len(buf)} bytes")
    codec = ansi_codec(code_page)
    out = []
    for i in range(count):
        _, _, base, size, _, _, _, _, _, name = entry.unpack_from(buf, start + i * entry.size)
        out.append(LoadedModule(base, size, name.split(b"\0", 1)[0].decode(codec, errors="replace")))
    return out


def build_module_information(modules: Sequence[LoadedModule], code_page: int = 1252) -> bytes:
    """The inverse of parse_module_information (what NtQuerySystemInformation class 11 returns)."""
    start, entry = MODULES_START, MODULE_ENTRY
    out = bytearray(start + len(modules) * entry.size)
    struct.pack_into("<I", out, 0, len(modules))
    for i, m in enumerate(modules):
        raw = m.path.encode(ansi_codec(code_page))
        name_at = raw.rfind(b"\\") + 1
        entry.pack_into(out, start + i * entry.size, 0, 0, m.base, m.size, 0, i, i, 1, name_at, raw)
    return bytes(out)
