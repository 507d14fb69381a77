"""Byte-exact writer of kernel-logger-style .etl files, for tests, benchmarks and sample traces.

``TraceWriter`` builds a trace the way the NT kernel logger (or, in compressed mode, a Win8+ relogger)
lays it out on disk, following the recipe of etl-format.md §6:

* buffer 0 is the header buffer: the logfile-header record (hook 0x0000, SYSTEM header,
  TRACE_LOGFILE_HEADER at the x86/x64 offsets of §1.5, then LoggerName and LogFileName) and optional
  0x0005 header-extension records (``u32 GroupMask[8]; u32 KernelEventVersion``);
* every other buffer belongs to one CPU and holds that CPU's records in timestamp order, each record
  padded to 8 bytes; buffers appear in the file in the order they would have been flushed (by the
  timestamp of their last record), so the file as a whole is *not* in time order across CPUs (§1.7);
* in compressed mode each data buffer's record area is LZXpress-compressed (§1.8) and buffers are packed
  back to back with no alignment.

Every record method appends one record to a CPU's stream; ``to_bytes()`` lays the streams out. All
layouts are written here explicitly with ``struct`` from the offsets documented in etl-format.md, on
purpose independent of ``pooltrace.etl``'s reader, so that round-trip tests check the reader against the
documented layout rather than against itself. Only hook ids and GUIDs come from
``pooltrace.definitions``.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Iterable, Sequence

from pooltrace.definitions import definitions
from pooltrace.etl.xpress import compress

__all__ = ["TraceWriter"]

# --- WMI_BUFFER_HEADER (etl-format.md §1.2): 0x48 bytes for both pointer sizes ---------------------------
BUFFER_HEADER_SIZE = 0x48
_BH_BUFFER_SIZE = 0x00  # u32, bytes of this buffer on disk
_BH_SAVED_OFFSET = 0x04  # u32, filled bytes incl. header (uncompressed)
_BH_CURRENT_OFFSET = 0x08  # u32
_BH_REFERENCE_COUNT = 0x0C  # u32
_BH_TIMESTAMP = 0x10  # i64, flush time
_BH_SEQUENCE_NUMBER = 0x18  # i64
_BH_CLOCK = 0x20  # u64 union, 0 in files
_BH_PROCESSOR_INDEX = 0x28  # u16
_BH_LOGGER_ID = 0x2A  # u16
_BH_STATE = 0x2C  # u32, 3; in compressed files the low 16 bits are the compression format (3 = XPRESS)
_BH_OFFSET = 0x30  # u32, filled bytes incl. header
_BH_BUFFER_FLAG = 0x34  # u16
_BH_BUFFER_TYPE = 0x36  # u16
# 0x38: 16 bytes of padding / reference time, left zero

BUFFER_FLAG_FLUSH_MARKER = 0x0001
BUFFER_FLAG_EVENTS_LOST = 0x0002
BUFFER_FLAG_BUFFER_LOST = 0x0004
BUFFER_FLAG_PROC_INDEX = 0x0020
BUFFER_FLAG_COMPRESSED = 0x0040
BUFFER_TYPE_GENERIC = 0
BUFFER_TYPE_HEADER = 4
BUFFER_STATE_FLUSH = 3
COMPRESSION_FORMAT_XPRESS = 3
LOGGER_ID_KERNEL = 0x1C  # a value seen in native kernel files; relogged files have 0
HEADER_BUFFER_ALIGN = 0x200  # relogged/compressed files: small header buffer rounded to 0x200

# --- record headers (etl-format.md §1.3) -------------------------------------------------------------------
TRACE_HEADER_FLAGS = 0xC0  # TRACE_HEADER_FLAG | TRACE_HEADER_EVENT_TRACE, the marker's top byte
# header type per pointer size: (32-bit trace, 64-bit trace)
_HEADER_TYPES = {
    "system": (0x01, 0x02),
    "compact": (0x03, 0x04),
    "perfinfo": (0x10, 0x11),
    "event": (0x12, 0x13),
    "full": (0x0A, 0x14),
}
SYSTEM_HEADER_SIZE = 0x20  # u32 Marker; u16 Size; u16 HookId; u32 TID; u32 PID; i64 SystemTime; u32 K; u32 U
COMPACT_HEADER_SIZE = 0x18  # as SYSTEM without KernelTime/UserTime
PERFINFO_HEADER_SIZE = 0x10  # u32 Marker; u16 Size; u16 HookId; i64 SystemTime
EVENT_HEADER_SIZE = 0x50
FULL_HEADER_SIZE = 0x30
PMC_COUNTERS_SHIFT = 8  # TRACE_HEADER_PMC_COUNTERS_MASK 0x0700: count of extra qwords
_VERSION_EXTENSION_BITS = 0x8700  # PEBS flag + PMC count: not part of the event version
MAX_PMC_COUNTERS = 7
EVENT_HEADER_FLAG_EXTENDED_INFO = 0x0001
EVENT_HEADER_FLAG_32_BIT_HEADER = 0x0020
EVENT_HEADER_FLAG_64_BIT_HEADER = 0x0040
EXT_ITEM_LINKAGE = 0x0001
MAX_STACK_FRAMES = 192  # ETW_STACK_SW_ARRAY_SIZE
SNAPSHOT_ENTRIES_PER_EVENT = 100  # EtwpPoolRunDown logs at most 100 entries per PoolSnap/BigPoolSnap event

# --- TRACE_LOGFILE_HEADER (etl-format.md §1.5): field offsets for (x86, x64) -----------------------------
_LH = {
    "BufferSize": (0x00, 0x00),
    "Version": (0x04, 0x04),
    "ProviderVersion": (0x08, 0x08),
    "NumberOfProcessors": (0x0C, 0x0C),
    "EndTime": (0x10, 0x10),
    "TimerResolution": (0x18, 0x18),
    "MaximumFileSize": (0x1C, 0x1C),
    "LogFileMode": (0x20, 0x20),
    "BuffersWritten": (0x24, 0x24),
    "StartBuffers": (0x28, 0x28),
    "PointerSize": (0x2C, 0x2C),
    "EventsLost": (0x30, 0x30),
    "CpuSpeedInMHz": (0x34, 0x34),
    "LoggerName": (0x38, 0x38),  # pointer slot; holds a timer-source enum on disk
    "LogFileName": (0x3C, 0x40),  # pointer slot; same
    "TimeZone": (0x40, 0x48),  # TIME_ZONE_INFORMATION (0xAC) + 4 pad
    "BootTime": (0xF0, 0xF8),
    "PerfFreq": (0xF8, 0x100),
    "StartTime": (0x100, 0x108),
    "ReservedFlags": (0x108, 0x110),  # clock type
    "BuffersLost": (0x10C, 0x114),
}
_LOGFILE_HEADER_SIZE = (0x110, 0x118)  # strings follow
TIME_ZONE_INFORMATION_SIZE = 0xAC
TIMER_RESOLUTION = 156250  # 15.625 ms in 100 ns units
LOG_FILE_MODE_SEQUENTIAL = 0x00000001
LOG_FILE_MODE_COMPRESSED_RELOG = 0x04010000  # EVENT_TRACE_COMPRESSED_MODE | EVENT_TRACE_RELOG_MODE
# timer-source values found in the LoggerName/LogFileName slots of a native kernel file (§1.5)
_NATIVE_NAME_SLOTS = (5, 7)
# logfile layout version (Version bytes 2 and 3): 1.5 for native Win10 files, 2.0 for compressed ones
_LAYOUT_NATIVE = (1, 5)
_LAYOUT_COMPRESSED = (2, 0)

HEADER_RECORD_TID = 0
HEADER_RECORD_PID = 4  # System
KTC_THREAD_ID = 0xFFFFFFFF
KTC_EVENT_VERSION = 2
_KTC_RSDS_OPCODES = (0x24, 0x25)  # DbgID_RSDS, DbgID_ILRSDS: same layout
_KERNEL_HEADERS = ("perfinfo", "system", "compact")


def _hooks(*names: str) -> frozenset[int]:
    hooks = definitions().hooks
    return frozenset(hooks[n] for n in names)


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def _check_int(name: str, value: int, bits: int, *, signed: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value:#x} does not fit in {'i' if signed else 'u'}{bits}")
    return value


def _utf16z(text: str) -> bytes:
    return text.encode("utf-16-le") + b"\0\0"


def _ansiz(name: str, text: str) -> bytes:
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} must be 8-bit text: {text!r}") from exc
    if b"\0" in raw:
        raise ValueError(f"{name} must not contain NUL: {text!r}")
    return raw + b"\0"


def _as_guid(name: str, value: uuid.UUID | str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        return uuid.UUID(value)
    raise ValueError(f"{name} must be a uuid.UUID or a GUID string")


class TraceWriter:
    """Build a kernel-logger-style .etl trace record by record, then lay it out with :meth:`to_bytes`.

    Timestamps (``ts``) are raw clock ticks as the kernel writes them (QPC by default). Records of one CPU
    are written in timestamp order (stable for equal timestamps); see the module docstring for the file
    layout. Every record method raises ``ValueError`` on input the real format cannot represent.
    """

    def __init__(
        self,
        pointer_size: int = 8,
        cpus: int = 2,
        *,
        compressed: bool = False,
        buffer_size: int = 65536,
        perf_freq: int = 10_000_000,
        clock_type: int = 1,
        start_qpc: int = 1_000_000_000,
        start_filetime: int = 133_000_000_000_000_000,
        boot_filetime: int | None = None,
        end_filetime: int | None = None,
        os_version: tuple[int, int] = (10, 0),
        os_build: int = 19041,
        logger_name: str = "pooltrace",
        logfile_name: str = "",
        events_lost: int = 0,
        buffers_lost: int = 0,
        cpu_speed_mhz: int = 2000,
        group_masks: Sequence[int] = (0x7, 0x40, 0, 0, 0, 0, 0, 0),
        header_extension: bool = True,
        log_file_mode: int | None = None,
    ) -> None:
        if pointer_size not in (4, 8):
            raise ValueError(f"pointer_size must be 4 or 8, got {pointer_size!r}")
        if not 1 <= cpus <= 0x800:  # ETW_PROCESSOR_INDEX_MASK 0x07FF
            raise ValueError(f"cpus must be 1..2048, got {cpus!r}")
        _check_int("buffer_size", buffer_size, 32)
        if buffer_size % 8 or buffer_size < 0x400:
            raise ValueError(f"buffer_size must be a multiple of 8 and at least 0x400, got {buffer_size}")
        if _check_int("perf_freq", perf_freq, 64, signed=True) <= 0:
            raise ValueError("perf_freq must be positive")
        if _check_int("cpu_speed_mhz", cpu_speed_mhz, 32) == 0:
            raise ValueError("cpu_speed_mhz must be positive")
        _check_int("clock_type", clock_type, 32)
        _check_int("start_qpc", start_qpc, 64, signed=True)
        _check_int("start_filetime", start_filetime, 64, signed=True)
        if len(os_version) != 2:
            raise ValueError("os_version must be (major, minor)")
        for part in os_version:
            _check_int("os_version", part, 8)
        _check_int("os_build", os_build, 32)
        _check_int("events_lost", events_lost, 32)
        _check_int("buffers_lost", buffers_lost, 32)

        self.pointer_size = pointer_size
        self.cpus = cpus
        self.compressed = compressed
        self.buffer_size = buffer_size
        self.perf_freq = perf_freq
        self.clock_type = clock_type
        self.start_qpc = start_qpc
        self.start_filetime = start_filetime
        self.cpu_speed_mhz = cpu_speed_mhz
        if boot_filetime is None:
            boot_filetime = start_filetime - self._ticks_to_100ns(start_qpc)
        self.boot_filetime = _check_int("boot_filetime", boot_filetime, 64, signed=True)
        self.end_filetime = None if end_filetime is None else _check_int("end_filetime", end_filetime, 64, signed=True)
        self.os_version = tuple(os_version)
        self.os_build = os_build
        self.logger_name = logger_name
        self.logfile_name = logfile_name
        self.events_lost = events_lost
        self.buffers_lost = buffers_lost
        if log_file_mode is None:
            log_file_mode = LOG_FILE_MODE_SEQUENTIAL | (LOG_FILE_MODE_COMPRESSED_RELOG if compressed else 0)
        self.log_file_mode = _check_int("log_file_mode", log_file_mode, 32)

        self._ptr = "Q" if pointer_size == 8 else "I"
        self._x64 = 1 if pointer_size == 8 else 0  # index into the (32-bit, 64-bit) tables
        self._streams: list[list[tuple[int, bytes]]] = [[] for _ in range(cpus)]
        self._header_records: list[bytes] = []
        self._buffer_flags: dict[tuple[int, int], int] = {}
        if header_extension:
            self.header_extension(group_masks)

    # --- public: bookkeeping -----------------------------------------------------------------------------

    @property
    def record_count(self) -> int:
        """Event records written: the logfile-header record, header-extension records and all others."""
        return 1 + len(self._header_records) + sum(len(s) for s in self._streams)

    def flag_buffer(self, cpu: int, index: int, flag: int) -> None:
        """OR ``flag`` (a BufferFlag such as 0x2 EVENTS_LOST or 0x4 BUFFER_LOST) into the ``index``-th data
        buffer of ``cpu`` (0 = that CPU's first buffer). Checked against the real buffer count by
        :meth:`to_bytes`."""
        self._check_cpu(cpu)
        _check_int("index", index, 31)  # >= 0
        self._buffer_flags[(cpu, index)] = self._buffer_flags.get((cpu, index), 0) | _check_int("flag", flag, 16)

    # --- public: header buffer ---------------------------------------------------------------------------

    def header_extension(self, group_masks: Sequence[int], kernel_event_version: int = 0) -> None:
        """Add a 0x0005 header-extension record (``u32 GroupMask[8]; u32 KernelEventVersion``) to the
        header buffer, after the logfile header and any earlier extension records."""
        masks = tuple(group_masks)
        if len(masks) != 8:
            raise ValueError(f"group_masks must have 8 entries, got {len(masks)}")
        for m in masks:
            _check_int("group_masks[i]", m, 32)
        _check_int("kernel_event_version", kernel_event_version, 32)
        payload = struct.pack("<8II", *masks, kernel_event_version)
        self._header_records.append(
            self._kernel_record(
                "system",
                definitions().hooks["HeaderExtension"],
                self.start_qpc,
                payload,
                version=2,
                tid=HEADER_RECORD_TID,
                pid=HEADER_RECORD_PID,
            )
        )

    # --- public: kernel events ---------------------------------------------------------------------------

    def pool(
        self,
        cpu: int,
        ts: int,
        hook: int,
        pool_type: int,
        tag: str | int,
        size: int,
        entry: int,
        session_id: int | None = None,
        *,
        header: str = "system",
        tid: int = 0,
        pid: int = 0,
        pmc: Sequence[int] = (),
    ) -> None:
        """Pool event 0x0E20..0x0E23 (ETW_POOL_EVENT, §2.1): ``u32 PoolType; u32 Tag; ptr NumberOfBytes;
        ptr Entry`` plus ``u32 SessionId`` for the session hooks (0x0E21/0x0E23; ``session_id`` None there
        means 0, and giving one for the other hooks is an error).

        The kernel logs pool events with a SYSTEM header (32 bytes, marker type 0x02/0x01) carrying the
        allocating thread and process (``tid``/``pid``); that is the default here. ``header="perfinfo"``
        writes the 16-byte PERFINFO variant without them (etl-format.md, Corrections)."""
        if hook not in _hooks("PoolAlloc", "PoolAllocSession", "PoolFree", "PoolFreeSession"):
            raise ValueError(f"pool hook must be 0x0E20..0x0E23, got {hook:#06x}")
        session = hook in _hooks("PoolAllocSession", "PoolFreeSession")
        if not session and session_id is not None:
            raise ValueError(f"hook {hook:#06x} has no SessionId field")
        payload = struct.pack(
            f"<II{self._ptr}{self._ptr}",
            _check_int("pool_type", pool_type, 32),
            self._tag(tag),
            self._check_ptr("size", size),
            self._check_ptr("entry", entry),
        )
        if session:
            payload += struct.pack("<I", _check_int("session_id", session_id or 0, 32))
        self._add(cpu, ts, self._kernel_record(header, hook, ts, payload, version=2, tid=tid, pid=pid, pmc=pmc))

    def pool_snapshot(self, cpu: int, ts: int, entries: Iterable[Sequence[int | str]], *, end: bool = False,
                      session_id: int | None = None) -> None:
        """PoolSnap rundown, 0x0E28 at the start (0x0E29 with ``end=True``), PERFINFO header: per event
        ``u32 Count`` (at most 100) then Count ``SYSTEM_POOLTAG`` right after it — ``u32 Tag; u32 PagedAllocs;
        u32 PagedFrees; [4 bytes padding on x64;] ptr PagedUsed; u32 NonPagedAllocs; u32 NonPagedFrees;
        ptr NonPagedUsed`` (40 bytes on x64, 28 on x86). ``entries`` are (tag, paged_allocs, paged_frees,
        paged_used, nonpaged_allocs, nonpaged_frees, nonpaged_used); more than 100 span several events.
        With ``session_id`` it is one session's snapshot, 0x0E2C/0x0E2D: ``u32 Count; u32 SessionId;`` entries."""
        p = self._ptr
        fmt = f"<III{'4x' if self.pointer_size == 8 else ''}{p}II{p}"
        packed = []
        for e in entries:
            tag, pa_, pf, pu, na, nf, nu = e
            packed.append(struct.pack(fmt, self._tag(tag), _check_int("paged_allocs", pa_, 32),
                                      _check_int("paged_frees", pf, 32), self._check_ptr("paged_used", pu),
                                      _check_int("nonpaged_allocs", na, 32), _check_int("nonpaged_frees", nf, 32),
                                      self._check_ptr("nonpaged_used", nu)))
        kind = "PoolSnapSession" if session_id is not None else "PoolSnap"
        self._snapshot(cpu, ts, kind + ("DCEnd" if end else "DCStart"), packed, True, session_id)

    def big_pool_snapshot(self, cpu: int, ts: int, entries: Iterable[Sequence], *, end: bool = False,
                          count_prefix: bool = True, session_id: int | None = None) -> None:
        """BigPoolSnap rundown, 0x0E2A at the start (0x0E2B with ``end=True``), PERFINFO header: per event
        ``u32 Count`` (at most 100) then Count ``SYSTEM_BIGPOOL_ENTRY`` — ``ptr VirtualAddress`` (bit 0 set for
        non-paged pool), ``ptr SizeInBytes``, ``u32 Tag`` (24 bytes on x64 with 4 bytes of tail padding, 12 on
        x86). ``entries`` are (address, size, tag, nonpaged). ``count_prefix=False`` writes the bare array
        (the form etl-format.md's Corrections describe; the kernel's rundown code writes the count).
        With ``session_id``: one session's big blocks, 0x0E2E/0x0E2F, ``u32 Count; u32 SessionId;`` entries."""
        p = self._ptr
        fmt = f"<{p}{p}I{'4x' if self.pointer_size == 8 else ''}"
        packed = []
        for address, size, tag, nonpaged in entries:
            if self._check_ptr("address", address) & 1:
                raise ValueError(f"big-pool address {address:#x} must be aligned (bit 0 carries non-paged)")
            packed.append(struct.pack(fmt, address | bool(nonpaged), self._check_ptr("size", size), self._tag(tag)))
        kind = "SessionBigPoolSnap" if session_id is not None else "BigPoolSnap"
        if session_id is not None and not count_prefix:
            raise ValueError("a session snapshot always has its count and session id")
        self._snapshot(cpu, ts, kind + ("DCEnd" if end else "DCStart"), packed, count_prefix, session_id)

    def _snapshot(self, cpu: int, ts: int, hook_name: str, packed: list[bytes], count_prefix: bool,
                  session_id: int | None) -> None:
        hook = definitions().hooks[hook_name]
        sid = b"" if session_id is None else struct.pack("<I", _check_int("session_id", session_id, 32))
        for k in range(0, len(packed), SNAPSHOT_ENTRIES_PER_EVENT):
            part = packed[k:k + SNAPSHOT_ENTRIES_PER_EVENT]
            payload = (struct.pack("<I", len(part)) + sid if count_prefix else b"") + b"".join(part)
            self._add(cpu, ts, self._kernel_record("perfinfo", hook, ts, payload, version=2))

    def stack(self, cpu: int, ts: int, event_ts: int, pid: int, tid: int, frames: Sequence[int]) -> None:
        """StackWalk Stack 0x1820 (PERFINFO header): ``u64 EventTimeStamp; u32 StackProcess;
        u32 StackThread; ptr Stack[n]`` with ``frames`` innermost first."""
        payload = self._stack_head(event_ts, pid, tid) + self._frames(frames)
        hook = definitions().hooks["Stack"]
        self._add(cpu, ts, self._kernel_record("perfinfo", hook, ts, payload, version=2))

    def stack_key_ref(
        self, cpu: int, ts: int, event_ts: int, pid: int, tid: int, key: int, *, user: bool = False
    ) -> None:
        """Stack-key reference 0x1825 (kernel part) or 0x1826 (``user=True``): ``u64 EventTimeStamp;
        u32 StackProcess; u32 StackThread; ptr StackKey``."""
        hook = definitions().hooks["StackKeyUser" if user else "StackKeyKernel"]
        payload = self._stack_head(event_ts, pid, tid) + struct.pack(f"<{self._ptr}", self._check_ptr("key", key))
        self._add(cpu, ts, self._kernel_record("perfinfo", hook, ts, payload, version=2))

    def stack_key_def(self, cpu: int, ts: int, key: int, frames: Sequence[int], *, rundown: bool = False) -> None:
        """Stack-key definition 0x1823 KeyDelete or 0x1824 KeyRundown (``rundown=True``):
        ``ptr StackKey; ptr Frames[n]``."""
        hook = definitions().hooks["StackKeyRundown" if rundown else "StackKeyDelete"]
        payload = struct.pack(f"<{self._ptr}", self._check_ptr("key", key)) + self._frames(frames)
        self._add(cpu, ts, self._kernel_record("perfinfo", hook, ts, payload, version=2))

    def image(
        self,
        cpu: int,
        ts: int,
        hook: int,
        base: int,
        size: int,
        pid: int,
        filename: str,
        *,
        checksum: int = 0,
        timedatestamp: int = 0,
        default_base: int = 0,
        header: str = "system",
        tid: int = 0,
        hpid: int = 0,
    ) -> None:
        """Image event 0x030A Load, 0x1402 Unload, 0x1403 DCStart, 0x1404 DCEnd; version-3 payload (§2.3):
        ``ptr ImageBase; ptr ImageSize; u32 ProcessId; u32 Checksum; u32 TimeDateStamp; u8 SignatureLevel;
        u8 SignatureType; u16 Reserved0; ptr DefaultBase; u32 Reserved1..4; WCHAR FileName[]``.
        ``tid``/``hpid`` fill the SYSTEM/COMPACT header's ThreadId/ProcessId."""
        if hook not in _hooks("ImageLoad", "ImageUnload", "ImageDCStart", "ImageDCEnd"):
            raise ValueError(f"image hook must be 0x030A, 0x1402, 0x1403 or 0x1404, got {hook:#06x}")
        p = self._ptr
        payload = struct.pack(
            f"<{p}{p}IIIBBH{p}IIII",
            self._check_ptr("base", base),
            self._check_ptr("size", size),
            _check_int("pid", pid, 32),
            _check_int("checksum", checksum, 32),
            _check_int("timedatestamp", timedatestamp, 32),
            0,  # SignatureLevel
            0,  # SignatureType
            0,  # Reserved0
            self._check_ptr("default_base", default_base),
            0,
            0,
            0,
            0,
        ) + _utf16z(filename)
        self._add(cpu, ts, self._kernel_record(header, hook, ts, payload, version=3, tid=tid, pid=hpid))

    def process(
        self,
        cpu: int,
        ts: int,
        hook: int,
        pid: int,
        ppid: int,
        image_name: str,
        command_line: str = "",
        *,
        session_id: int = 0,
        unique_key: int = 0,
        exit_status: int = 0,
        sid: bytes | None = None,
        flags: int = 0,
        version: int = 4,
        header: str = "system",
    ) -> None:
        """Process event 0x0301 Start, 0x0302 End, 0x0303 DCStart, 0x0304 DCEnd with the version-4 payload
        (§2.4): ``ptr UniqueProcessKey; u32 ProcessId; u32 ParentId; u32 SessionId; i32 ExitStatus;
        ptr DirectoryTableBase; u32 Flags; UserSID; char ImageFileName[]; WCHAR CommandLine[];
        WCHAR PackageFullName[]; WCHAR ApplicationId[]`` (the last two empty). ``version`` only sets the
        marker's version word; the layout is always v4.

        ``sid`` None writes the 4-byte zero UserSID form; otherwise ``sid`` is the binary SID, written in
        TOKEN_USER form (a non-zero ``Sid`` pointer and ``Attributes`` = 2 pointer-sized slots, then the
        SID). The header's ThreadId is 0 and its ProcessId is ``pid``."""
        if hook not in _hooks("ProcessStart", "ProcessEnd", "ProcessDCStart", "ProcessDCEnd"):
            raise ValueError(f"process hook must be 0x0301..0x0304, got {hook:#06x}")
        p = self._ptr
        payload = struct.pack(
            f"<{p}IIIi{p}I",
            self._check_ptr("unique_key", unique_key),
            _check_int("pid", pid, 32),
            _check_int("ppid", ppid, 32),
            _check_int("session_id", session_id, 32),
            _check_int("exit_status", exit_status, 32, signed=True),
            0,  # DirectoryTableBase
            _check_int("flags", flags, 32),
        )
        payload += self._user_sid(sid)
        payload += _ansiz("image_name", image_name) + _utf16z(command_line) + _utf16z("") + _utf16z("")
        self._add(cpu, ts, self._kernel_record(header, hook, ts, payload, version=version, tid=0, pid=pid))

    def thread(
        self,
        cpu: int,
        ts: int,
        hook: int,
        pid: int,
        tid: int,
        *,
        name: str | None = None,
        win32_start: int = 0,
        version: int = 3,
        header: str = "system",
    ) -> None:
        """Thread event 0x0501 Start, 0x0502 End, 0x0503 DCStart, 0x0504 DCEnd with the version-3 payload
        (§2.4): ``u32 ProcessId; u32 ThreadId; ptr StackBase, StackLimit, UserStackBase, UserStackLimit,
        Affinity, Win32StartAddress, TebBase; u32 SubProcessTag; u8 BasePriority, PagePriority, IoPriority,
        Flags`` (0x48 bytes on x64, 0x2C on x86), then the UTF-16 thread name if ``name`` is given. The
        header carries ``tid``/``pid``."""
        if hook not in _hooks("ThreadStart", "ThreadEnd", "ThreadDCStart", "ThreadDCEnd"):
            raise ValueError(f"thread hook must be 0x0501..0x0504, got {hook:#06x}")
        p = self._ptr
        payload = struct.pack(
            f"<II{p * 7}IBBBB",
            _check_int("pid", pid, 32),
            _check_int("tid", tid, 32),
            0,  # StackBase
            0,  # StackLimit
            0,  # UserStackBase
            0,  # UserStackLimit
            0,  # Affinity
            self._check_ptr("win32_start", win32_start),
            0,  # TebBase
            0,  # SubProcessTag
            8,  # BasePriority (normal)
            5,  # PagePriority (normal)
            2,  # IoPriority (normal)
            0,  # Flags
        )
        if name is not None:
            payload += _utf16z(name)
        self._add(cpu, ts, self._kernel_record(header, hook, ts, payload, version=version, tid=tid, pid=pid))

    # --- public: KernelTraceControl, manifest and classic events -----------------------------------------

    def ktc_image_id(
        self, cpu: int, ts: int, base: int, size: int, pid: int, timedatestamp: int, original_filename: str
    ) -> None:
        """KernelTraceControl ImageId (opcode 0, §2.5): ``ptr ImageBase; ptr ImageSize; u32 ProcessId;
        u32 TimeDateStamp; WCHAR OriginalFileName[]``; classic header with ThreadId 0xFFFFFFFF."""
        p = self._ptr
        payload = struct.pack(
            f"<{p}{p}II",
            self._check_ptr("base", base),
            self._check_ptr("size", size),
            _check_int("pid", pid, 32),
            _check_int("timedatestamp", timedatestamp, 32),
        ) + _utf16z(original_filename)
        guid = definitions().guids["KernelTraceControl"]
        opcode = definitions().ktc_opcodes["ImageId"]
        self.classic(cpu, ts, guid, opcode, payload, version=KTC_EVENT_VERSION, pid=pid, tid=KTC_THREAD_ID)

    def ktc_rsds(
        self, cpu: int, ts: int, base: int, pid: int, guid: uuid.UUID, age: int, pdb_name: str, *, opcode: int = 0x24
    ) -> None:
        """KernelTraceControl DbgID_RSDS (opcode 0x24; 0x25 ILRSDS has the same layout, §2.5):
        ``ptr ImageBase; u32 ProcessId; GUID GuidSig (bytes_le); u32 Age; char PdbFileName[]``."""
        if opcode not in _KTC_RSDS_OPCODES:
            raise ValueError(f"RSDS opcode must be 0x24 or 0x25, got {opcode:#x}")
        payload = struct.pack(
            f"<{self._ptr}I16sI",
            self._check_ptr("base", base),
            _check_int("pid", pid, 32),
            _as_guid("guid", guid).bytes_le,
            _check_int("age", age, 32),
        ) + _ansiz("pdb_name", pdb_name)
        ktc = definitions().guids["KernelTraceControl"]
        self.classic(cpu, ts, ktc, opcode, payload, version=KTC_EVENT_VERSION, pid=pid, tid=KTC_THREAD_ID)

    def event(
        self,
        cpu: int,
        ts: int,
        provider: uuid.UUID | str,
        event_id: int,
        *,
        opcode: int = 0,
        version: int = 0,
        level: int = 4,
        keyword: int = 0,
        pid: int = 0,
        tid: int = 0,
        ext_items: Iterable[tuple[int, bytes]] = (),
        user_data: bytes = b"",
    ) -> None:
        """Manifest/TraceLogging event with an EVENT_HEADER (type 0x13 on 64-bit, 0x12 on 32-bit traces).

        Layout (§1.3): ``u16 Size; u8 HeaderType; u8 MarkerFlags; u16 Flags; u16 EventProperty; u32 TID;
        u32 PID; i64 TimeStamp; GUID ProviderId; EVENT_DESCRIPTOR{u16 Id; u8 Version; u8 Channel; u8 Level;
        u8 Opcode; u16 Task; u64 Keyword}; u64 ProcessorTime; GUID ActivityId``, then the extended items
        (§1.4: ``u16 ItemSize; u16 ExtType; u16 Linkage; u16 DataSize; data padded to 8``; Flags bit 0
        EXTENDED_INFO is set when there are any), then ``user_data``."""
        items = [(_check_int("ext_type", t, 16), bytes(d)) for t, d in ext_items]
        ext = bytearray()
        for i, (ext_type, data) in enumerate(items):
            linkage = EXT_ITEM_LINKAGE if i + 1 < len(items) else 0
            item_size = 8 + _pad8(len(data))
            _check_int("ext item size", item_size, 16)
            ext += struct.pack("<HHHH", item_size, ext_type, linkage, len(data))
            ext += data + bytes(_pad8(len(data)) - len(data))
        flags = EVENT_HEADER_FLAG_64_BIT_HEADER if self.pointer_size == 8 else EVENT_HEADER_FLAG_32_BIT_HEADER
        if items:
            flags |= EVENT_HEADER_FLAG_EXTENDED_INFO
        size = self._check_size(EVENT_HEADER_SIZE + len(ext) + len(user_data))
        head = struct.pack(
            "<HBBHHIIq16sHBBBBHQQ16s",
            size,
            _HEADER_TYPES["event"][self._x64],
            TRACE_HEADER_FLAGS,
            flags,
            0,  # EventProperty
            _check_int("tid", tid, 32),
            _check_int("pid", pid, 32),
            self._check_ts(ts),
            _as_guid("provider", provider).bytes_le,
            _check_int("event_id", event_id, 16),
            _check_int("version", version, 8),
            0,  # Channel
            _check_int("level", level, 8),
            _check_int("opcode", opcode, 8),
            0,  # Task
            _check_int("keyword", keyword, 64),
            0,  # ProcessorTime
            bytes(16),  # ActivityId
        )
        self._add(cpu, ts, head + bytes(ext) + bytes(user_data))

    def classic(
        self,
        cpu: int,
        ts: int,
        guid: uuid.UUID | str,
        opcode: int,
        payload: bytes,
        *,
        version: int = 0,
        pid: int = 0,
        tid: int = KTC_THREAD_ID,
    ) -> None:
        """Classic (MOF) event with an EVENT_TRACE_HEADER, type 0x14 (FULL_HEADER64) or 0x0A (FULL_HEADER32):
        ``u16 Size; u8 HeaderType; u8 MarkerFlags; u8 Type(opcode); u8 Level; u16 Version; u32 TID;
        u32 PID; i64 TimeStamp; GUID; u64 ProcessorTime`` (Level and ProcessorTime 0), then ``payload``."""
        size = self._check_size(FULL_HEADER_SIZE + len(payload))
        head = struct.pack(
            "<HBBBBHIIq16sQ",
            size,
            _HEADER_TYPES["full"][self._x64],
            TRACE_HEADER_FLAGS,
            _check_int("opcode", opcode, 8),
            0,  # Level
            _check_int("version", version, 16),
            _check_int("tid", tid, 32),
            _check_int("pid", pid, 32),
            self._check_ts(ts),
            _as_guid("guid", guid).bytes_le,
            0,  # ProcessorTime
        )
        self._add(cpu, ts, head + bytes(payload))

    def raw(self, cpu: int, ts: int, record_bytes: bytes) -> None:
        """Append an already-built record. ``ts`` only orders it within the CPU's stream; the bytes are
        written unchanged (then padded with zeros to 8) and count as one record."""
        record = bytes(record_bytes)
        if not record:
            raise ValueError("raw record must not be empty")
        self._add(cpu, ts, record)

    # --- public: output ----------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Lay out the whole trace: the header buffer, then every data buffer in flush order."""
        capacity = self.buffer_size - BUFFER_HEADER_SIZE
        data_buffers = []  # (last_ts, cpu, index within the cpu, record area)
        last_ts = None
        for cpu, stream in enumerate(self._streams):
            area = bytearray()
            index = 0
            area_last = 0
            for ts, record in sorted(stream, key=lambda item: item[0]):
                padded = record + bytes(_pad8(len(record)) - len(record))
                if len(padded) > capacity:
                    raise ValueError(f"a {len(record)}-byte record does not fit in a {self.buffer_size}-byte buffer")
                if len(area) + len(padded) > capacity:
                    data_buffers.append((area_last, cpu, index, bytes(area)))
                    area.clear()
                    index += 1
                area += padded
                area_last = ts
                last_ts = ts if last_ts is None else max(last_ts, ts)
            if area:
                data_buffers.append((area_last, cpu, index, bytes(area)))
        counts = [0] * self.cpus
        for _, cpu, _, _ in data_buffers:
            counts[cpu] += 1
        for (cpu, index), _flag in self._buffer_flags.items():
            if index >= counts[cpu]:
                raise ValueError(f"flag_buffer: CPU {cpu} has {counts[cpu]} data buffers, no buffer #{index}")
        data_buffers.sort(key=lambda b: (b[0], b[1], b[2]))  # flush order; one CPU's buffers keep their order

        end_filetime = self.end_filetime
        if end_filetime is None:
            end_filetime = self.start_filetime
            if last_ts is not None:
                end_filetime += self._ticks_to_100ns(last_ts - self.start_qpc)

        out = bytearray(self._header_buffer(1 + len(data_buffers), end_filetime))
        for seq, (flush_ts, cpu, index, area) in enumerate(data_buffers, start=1):
            flag = BUFFER_FLAG_PROC_INDEX | self._buffer_flags.get((cpu, index), 0)
            filled = BUFFER_HEADER_SIZE + len(area)
            if self.compressed:
                body = compress(area)
                flag |= BUFFER_FLAG_COMPRESSED
                if seq == len(data_buffers):
                    flag |= BUFFER_FLAG_FLUSH_MARKER  # real relogged files mark the last buffer
                state = COMPRESSION_FORMAT_XPRESS
                on_disk = BUFFER_HEADER_SIZE + len(body)
                logger_id = 0
            else:
                body = area + b"\xff" * (capacity - len(area))
                state = BUFFER_STATE_FLUSH
                on_disk = self.buffer_size
                logger_id = LOGGER_ID_KERNEL
            out += self._buffer_header(
                buffer_size=on_disk,
                filled=filled,
                timestamp=flush_ts,
                sequence=seq,
                cpu=cpu,
                logger_id=logger_id,
                state=state,
                flag=flag,
                buffer_type=BUFFER_TYPE_GENERIC,
            )
            out += body
        return bytes(out)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_bytes` to ``path``."""
        with open(path, "wb") as fh:
            fh.write(self.to_bytes())

    # --- internals ---------------------------------------------------------------------------------------

    def _ticks_to_100ns(self, ticks: int) -> int:
        """Clock ticks to 100 ns units with the scale of §1.6 for this trace's clock type."""
        if self.clock_type == 2:  # system time: already 100 ns units
            return ticks
        if self.clock_type == 3:  # CPU cycles
            return ticks * 10 // self.cpu_speed_mhz
        return ticks * 10_000_000 // self.perf_freq  # QPC (and anything unknown)

    def _check_cpu(self, cpu: int) -> None:
        if isinstance(cpu, bool) or not isinstance(cpu, int) or not 0 <= cpu < self.cpus:
            raise ValueError(f"cpu must be 0..{self.cpus - 1}, got {cpu!r}")

    @staticmethod
    def _check_ts(ts: int) -> int:
        return _check_int("ts", ts, 64, signed=True)

    def _check_ptr(self, name: str, value: int) -> int:
        return _check_int(name, value, 8 * self.pointer_size)

    @staticmethod
    def _check_size(size: int) -> int:
        if size > 0xFFFF:
            raise ValueError(f"record of {size} bytes exceeds the 16-bit Size field")
        return size

    @staticmethod
    def _tag(tag: str | int) -> int:
        if isinstance(tag, str):
            try:
                raw = tag.encode("latin-1")
            except UnicodeEncodeError as exc:
                raise ValueError(f"pool tag must be 8-bit text: {tag!r}") from exc
            if len(raw) != 4:
                raise ValueError(f"pool tag must be 4 characters, got {tag!r}")
            return int.from_bytes(raw, "little")
        return _check_int("tag", tag, 32)

    def _stack_head(self, event_ts: int, pid: int, tid: int) -> bytes:
        return struct.pack(
            "<QII", _check_int("event_ts", event_ts, 64), _check_int("pid", pid, 32), _check_int("tid", tid, 32)
        )

    def _frames(self, frames: Sequence[int]) -> bytes:
        frames = list(frames)
        if len(frames) > MAX_STACK_FRAMES:
            raise ValueError(f"at most {MAX_STACK_FRAMES} frames, got {len(frames)}")
        for f in frames:
            self._check_ptr("frame", f)
        return struct.pack(f"<{len(frames)}{self._ptr}", *frames)

    def _user_sid(self, sid: bytes | None) -> bytes:
        if sid is None:
            return bytes(4)
        sid = bytes(sid)
        if len(sid) < 8 or sid[0] != 1 or len(sid) != 8 + 4 * sid[1]:
            raise ValueError("sid must be a binary SID: revision 1, 8 + 4*SubAuthorityCount bytes")
        # TOKEN_USER {PSID Sid; u32 Attributes (+pad)}: the Sid pointer must be non-zero (the reader tells
        # this form from the 4-byte zero form by it); kernel-looking fake address, Attributes 0
        sid_pointer = 0xFFFF_C000_0000_1000 if self.pointer_size == 8 else 0x8000_1000
        return struct.pack(f"<{self._ptr}{self._ptr}", sid_pointer, 0) + sid

    def _add(self, cpu: int, ts: int, record: bytes) -> None:
        self._check_cpu(cpu)
        self._check_ts(ts)
        self._streams[cpu].append((ts, record))

    def _kernel_record(
        self,
        header: str,
        hook: int,
        ts: int,
        payload: bytes,
        *,
        version: int,
        tid: int = 0,
        pid: int = 0,
        pmc: Sequence[int] = (),
    ) -> bytes:
        """A SYSTEM / COMPACT / PERFINFO record: marker (flags 0xC0, header type, version word with the PMC
        count in bits 8-10), u16 Size, u16 HookId, [u32 TID, u32 PID,] i64 SystemTime, [u32 KernelTime,
        u32 UserTime], PMC qwords, payload."""
        if header not in _KERNEL_HEADERS:
            raise ValueError(f"header must be one of {', '.join(_KERNEL_HEADERS)}; got {header!r}")
        _check_int("hook", hook, 16)
        _check_int("tid", tid, 32)
        _check_int("pid", pid, 32)
        if _check_int("version", version, 16) & _VERSION_EXTENSION_BITS:
            raise ValueError(f"version {version:#x} overlaps the PEBS/PMC extension bits 0x8700")
        if header == "perfinfo" and (tid or pid):
            raise ValueError("a PERFINFO header has no ThreadId/ProcessId; use header='system' or 'compact'")
        pmc = list(pmc)
        if len(pmc) > MAX_PMC_COUNTERS:
            raise ValueError(f"at most {MAX_PMC_COUNTERS} PMC counters, got {len(pmc)}")
        for counter in pmc:
            _check_int("pmc counter", counter, 64)
        extension = struct.pack(f"<{len(pmc)}Q", *pmc)
        marker = (
            TRACE_HEADER_FLAGS << 24 | _HEADER_TYPES[header][self._x64] << 16 | len(pmc) << PMC_COUNTERS_SHIFT | version
        )
        fixed = {"system": SYSTEM_HEADER_SIZE, "compact": COMPACT_HEADER_SIZE, "perfinfo": PERFINFO_HEADER_SIZE}
        size = self._check_size(fixed[header] + len(extension) + len(payload))
        ts = self._check_ts(ts)
        if header == "perfinfo":
            head = struct.pack("<IHHq", marker, size, hook, ts)
        elif header == "compact":
            head = struct.pack("<IHHIIq", marker, size, hook, tid, pid, ts)
        else:
            head = struct.pack("<IHHIIqII", marker, size, hook, tid, pid, ts, 0, 0)
        return head + extension + payload

    def _buffer_header(
        self,
        *,
        buffer_size: int,
        filled: int,
        timestamp: int,
        sequence: int,
        cpu: int,
        logger_id: int,
        state: int,
        flag: int,
        buffer_type: int,
    ) -> bytes:
        hdr = bytearray(BUFFER_HEADER_SIZE)
        struct.pack_into("<I", hdr, _BH_BUFFER_SIZE, buffer_size)
        struct.pack_into("<I", hdr, _BH_SAVED_OFFSET, filled)
        struct.pack_into("<I", hdr, _BH_CURRENT_OFFSET, filled)
        struct.pack_into("<I", hdr, _BH_REFERENCE_COUNT, 0)
        struct.pack_into("<q", hdr, _BH_TIMESTAMP, timestamp)
        struct.pack_into("<q", hdr, _BH_SEQUENCE_NUMBER, sequence)
        struct.pack_into("<Q", hdr, _BH_CLOCK, 0)
        struct.pack_into("<H", hdr, _BH_PROCESSOR_INDEX, cpu)
        struct.pack_into("<H", hdr, _BH_LOGGER_ID, logger_id)
        struct.pack_into("<I", hdr, _BH_STATE, state)
        struct.pack_into("<I", hdr, _BH_OFFSET, filled)
        struct.pack_into("<H", hdr, _BH_BUFFER_FLAG, flag)
        struct.pack_into("<H", hdr, _BH_BUFFER_TYPE, buffer_type)
        return bytes(hdr)

    def _logfile_header(self, buffers_written: int, end_filetime: int) -> bytes:
        """TRACE_LOGFILE_HEADER at the §1.5 offsets for this pointer size, then the two UTF-16 names."""
        x = self._x64
        body = bytearray(_LOGFILE_HEADER_SIZE[x])

        def put(field: str, fmt: str, value: int) -> None:
            struct.pack_into("<" + fmt, body, _LH[field][x], value)

        major, minor = self.os_version
        sub_version, sub_minor = _LAYOUT_COMPRESSED if self.compressed else _LAYOUT_NATIVE
        name_slots = (0, 0) if self.compressed else _NATIVE_NAME_SLOTS
        put("BufferSize", "I", self.buffer_size)
        put("Version", "I", major | minor << 8 | sub_version << 16 | sub_minor << 24)
        put("ProviderVersion", "I", self.os_build)
        put("NumberOfProcessors", "I", self.cpus)
        put("EndTime", "q", end_filetime)
        put("TimerResolution", "I", TIMER_RESOLUTION)
        put("MaximumFileSize", "I", 0)
        put("LogFileMode", "I", self.log_file_mode)
        put("BuffersWritten", "I", buffers_written)
        put("StartBuffers", "I", 0)
        put("PointerSize", "I", self.pointer_size)
        put("EventsLost", "I", self.events_lost)
        put("CpuSpeedInMHz", "I", self.cpu_speed_mhz)
        put("LoggerName", self._ptr, name_slots[0])
        put("LogFileName", self._ptr, name_slots[1])
        body[_LH["TimeZone"][x] : _LH["TimeZone"][x] + TIME_ZONE_INFORMATION_SIZE] = self._time_zone()
        put("BootTime", "q", self.boot_filetime)
        put("PerfFreq", "q", self.perf_freq)
        put("StartTime", "q", self.start_filetime)
        put("ReservedFlags", "I", self.clock_type)
        put("BuffersLost", "I", self.buffers_lost)
        return bytes(body) + _utf16z(self.logger_name) + _utf16z(self.logfile_name)

    @staticmethod
    def _time_zone() -> bytes:
        """TIME_ZONE_INFORMATION for UTC: i32 Bias; WCHAR StandardName[32]; SYSTEMTIME StandardDate;
        i32 StandardBias; WCHAR DaylightName[32]; SYSTEMTIME DaylightDate; i32 DaylightBias."""
        name = "Coordinated Universal Time".encode("utf-16-le").ljust(64, b"\0")
        tz = struct.pack("<i64s16si64s16si", 0, name, bytes(16), 0, name, bytes(16), 0)
        assert len(tz) == TIME_ZONE_INFORMATION_SIZE
        return tz

    def _header_buffer(self, buffers_written: int, end_filetime: int) -> bytes:
        hook = definitions().hooks["LogfileHeader"]
        logfile = self._kernel_record(
            "system",
            hook,
            self.start_qpc,
            self._logfile_header(buffers_written, end_filetime),
            version=2,
            tid=HEADER_RECORD_TID,
            pid=HEADER_RECORD_PID,
        )
        area = bytearray()
        for record in [logfile, *self._header_records]:
            area += record + bytes(_pad8(len(record)) - len(record))
        filled = BUFFER_HEADER_SIZE + len(area)
        if self.compressed:
            # relogged files: a small, uncompressed header buffer; zero padding to 0x200
            on_disk = -(-filled // HEADER_BUFFER_ALIGN) * HEADER_BUFFER_ALIGN
            flag = BUFFER_FLAG_FLUSH_MARKER
            tail = bytes(on_disk - filled)
            logger_id = 0
        else:
            on_disk = self.buffer_size
            if filled > on_disk:
                raise ValueError(f"header records ({filled} bytes) do not fit in a {on_disk}-byte buffer")
            flag = BUFFER_FLAG_FLUSH_MARKER | BUFFER_FLAG_PROC_INDEX
            tail = b"\xff" * (on_disk - filled)
            logger_id = LOGGER_ID_KERNEL
        header = self._buffer_header(
            buffer_size=on_disk,
            filled=filled,
            timestamp=0,
            sequence=0,
            cpu=0,
            logger_id=logger_id,
            state=BUFFER_STATE_FLUSH,
            flag=flag,
            buffer_type=BUFFER_TYPE_HEADER,
        )
        return header + bytes(area) + tail
